//! The grpc-timeout parser on any bytes: no panic, and what it accepts is what the spec allows.

#![no_main]

use libfuzzer_sys::fuzz_target;
use lazyserve_request::deadline::{parse_grpc_timeout, MAX_TIMEOUT_DIGITS};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else { return };
    if let Ok(d) = parse_grpc_timeout(value) {
        let (digits, unit) = value.split_at(value.len() - 1);
        assert!((1..=MAX_TIMEOUT_DIGITS).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()), "{value:?}");
        assert!("HMSmun".contains(unit), "{value:?}");
        assert!(d.as_secs() <= 99_999_999 * 3600, "{value:?}");
    }
});
