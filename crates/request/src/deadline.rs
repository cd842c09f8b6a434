//! A caller's deadline as gRPC sends it: the `grpc-timeout` header of the gRPC over HTTP/2
//! protocol (PROTOCOL-HTTP2.md: `TimeoutValue` = 1 to 8 ASCII digits, then one `TimeoutUnit`
//! of H, M, S, m, u or n). Eight digits keep every value, even in hours, far inside a u64 of
//! seconds, so the conversion cannot overflow.

use std::time::Duration;

/// The most digits the spec allows in a timeout value.
pub const MAX_TIMEOUT_DIGITS: usize = 8;

/// Why a `grpc-timeout` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeoutError {
    #[error("is empty")]
    Empty,
    #[error("{0:?} has no digits before its unit")]
    NoDigits(String),
    #[error("{value:?} has {digits} digits, at most {MAX_TIMEOUT_DIGITS} are allowed")]
    TooManyDigits { value: String, digits: usize },
    #[error("{0:?} is not ASCII digits followed by one unit")]
    NotDigits(String),
    #[error("{value:?} ends in {unit:?}, not a unit (H, M, S, m, u or n)")]
    BadUnit { value: String, unit: char },
}

/// Parses a `grpc-timeout` value such as "100m" or "5S".
pub fn parse_grpc_timeout(value: &str) -> Result<Duration, TimeoutError> {
    let unit = value.chars().next_back().ok_or(TimeoutError::Empty)?;
    let digits = &value[..value.len() - unit.len_utf8()];
    let scale: fn(u64) -> Duration = match unit {
        'H' => |n| Duration::from_secs(n * 3600),
        'M' => |n| Duration::from_secs(n * 60),
        'S' => Duration::from_secs,
        'm' => Duration::from_millis,
        'u' => Duration::from_micros,
        'n' => Duration::from_nanos,
        _ => return Err(TimeoutError::BadUnit { value: value.to_string(), unit }),
    };
    if digits.is_empty() {
        return Err(TimeoutError::NoDigits(value.to_string()));
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TimeoutError::NotDigits(value.to_string()));
    }
    if digits.len() > MAX_TIMEOUT_DIGITS {
        return Err(TimeoutError::TooManyDigits { value: value.to_string(), digits: digits.len() });
    }
    // At most 8 ASCII digits: the parse cannot fail, and 99_999_999 hours fit a u64 of seconds.
    let n: u64 = digits.parse().map_err(|_| TimeoutError::NotDigits(value.to_string()))?;
    Ok(scale(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_every_unit() -> Result<(), TimeoutError> {
        assert_eq!(parse_grpc_timeout("2H")?, Duration::from_secs(7200));
        assert_eq!(parse_grpc_timeout("3M")?, Duration::from_secs(180));
        assert_eq!(parse_grpc_timeout("5S")?, Duration::from_secs(5));
        assert_eq!(parse_grpc_timeout("100m")?, Duration::from_millis(100));
        assert_eq!(parse_grpc_timeout("250u")?, Duration::from_micros(250));
        assert_eq!(parse_grpc_timeout("7n")?, Duration::from_nanos(7));
        assert_eq!(parse_grpc_timeout("0S")?, Duration::ZERO);
        assert_eq!(parse_grpc_timeout("00000010m")?, Duration::from_millis(10));
        assert_eq!(parse_grpc_timeout("99999999H")?, Duration::from_secs(99_999_999 * 3600));
        Ok(())
    }

    #[test]
    fn refuses_what_the_spec_does_not_allow() {
        for (value, why) in [
            ("", "is empty"),
            ("S", "no digits"),
            ("123456789S", "9 digits, at most 8"),
            ("18446744073709551616H", "at most 8"),
            ("-5S", "not ASCII digits"),
            ("+5S", "not ASCII digits"),
            (" 5S", "not ASCII digits"),
            ("5 S", "not ASCII digits"),
            ("1.5S", "not ASCII digits"),
            ("١٢S", "not ASCII digits"),
            ("5", "not a unit"),
            ("5s", "not a unit"),
            ("5Sx", "not a unit"),
            ("5é", "not a unit"),
            ("5S ", "not a unit"),
        ] {
            let err = parse_grpc_timeout(value).expect_err(value).to_string();
            assert!(err.contains(why), "{value:?}: {err}");
        }
    }

    const UNITS: &str = "HMSmun";

    fn nanos(n: u64, unit: char) -> u128 {
        let per: u128 = match unit {
            'H' => 3_600_000_000_000,
            'M' => 60_000_000_000,
            'S' => 1_000_000_000,
            'm' => 1_000_000,
            'u' => 1_000,
            _ => 1,
        };
        n as u128 * per
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn any_string_is_refused_or_is_what_the_spec_allows(value in "[0-9HMSmun +.-]{0,12}|\\PC{0,12}") {
            if let Ok(d) = parse_grpc_timeout(&value) {
                let (digits, unit) = value.split_at(value.len() - 1);
                prop_assert!((1..=MAX_TIMEOUT_DIGITS).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()));
                prop_assert!(UNITS.contains(unit));
                prop_assert_eq!(d.as_nanos(), nanos(digits.parse().unwrap(), unit.chars().next().unwrap()));
            }
        }

        #[test]
        fn every_spec_value_parses_exactly(n in 0u64..100_000_000, pad in 0usize..8, unit in proptest::sample::select(UNITS.chars().collect::<Vec<_>>())) {
            let digits = format!("{n:0pad$}");
            prop_assume!(digits.len() <= MAX_TIMEOUT_DIGITS);
            let d = parse_grpc_timeout(&format!("{digits}{unit}")).unwrap();
            prop_assert_eq!(d.as_nanos(), nanos(n, unit));
        }

        #[test]
        fn more_than_eight_digits_are_refused(digits in "[0-9]{9,30}", unit in proptest::sample::select(UNITS.chars().collect::<Vec<_>>())) {
            let err = parse_grpc_timeout(&format!("{digits}{unit}")).unwrap_err();
            let expected = TimeoutError::TooManyDigits { value: format!("{digits}{unit}"), digits: digits.len() };
            prop_assert_eq!(err, expected);
        }
    }
}
