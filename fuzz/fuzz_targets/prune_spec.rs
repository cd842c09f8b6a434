//! The prune-spec parser on any string and depth: no panic, and an accepted schedule keeps the
//! invariants the engine relies on.

#![no_main]

use libfuzzer_sys::fuzz_target;
use lazyserve_request::Schedule;

fuzz_target!(|data: &[u8]| {
    let Some((&depth, spec)) = data.split_first() else { return };
    let Ok(spec) = std::str::from_utf8(spec) else { return };
    let num_layers = depth as usize;
    match Schedule::parse(spec, num_layers) {
        Ok(s) => {
            for (i, stage) in s.stages.iter().enumerate() {
                assert!(stage.layer.checked_add(1).is_some_and(|l| l < num_layers), "{spec:?}: layer {} of {num_layers}", stage.layer);
                assert!(stage.keep > 0.0 && stage.keep <= 1.0, "{spec:?}");
                assert!(i == 0 || stage.layer > s.stages[i - 1].layer, "{spec:?}");
            }
            assert!(s.maxpool % 2 == 1 && s.window >= 1, "{spec:?}");
        }
        Err(e) => assert!(e.to_string().starts_with("invalid prune: "), "{spec:?}: {e}"),
    }
});
