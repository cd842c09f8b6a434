//! Pruning schedules: which layers prune, how many of the still-alive tokens they keep, how
//! tokens are scored. LazyLLM, arXiv 2407.14057, section 3.2 (progressive pruning).

use serde::Serialize;

use crate::{Error, Result};

/// How a pruning layer ranks tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// LazyLLM: the last token's attention, re-selected at every step, pruned tokens revived
    /// from the Aux Cache when selected again.
    Lazy,
    /// Baseline: the same budget with random scores (seeded).
    Random,
    /// Baseline: select once during prefill, never revive (decode attends to what prefill kept).
    Static,
}

/// One pruning layer: after layer `layer`, keep `keep` of the tokens still alive.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stage {
    pub layer: usize,
    pub keep: f32,
}

/// A validated pruning schedule for a model of `num_layers` layers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Schedule {
    /// The preset name or spec it was parsed from.
    pub name: String,
    pub mode: Mode,
    pub stages: Vec<Stage>,
    /// Max-pool scores over this many neighbouring positions (odd; 1 = off): keeps spans such
    /// as the digits of a number together.
    pub maxpool: usize,
    /// Always keep the first `sinks` tokens (attention sinks).
    pub sinks: usize,
    /// Prefill scores average the attention of the last `window` prompt queries (an
    /// observation window, always kept); decode steps score with their one new token.
    pub window: usize,
}

/// Named presets, as fractions of depth so that they carry over to deeper or shallower
/// models. On SmolLM2-135M (30 layers) `default` prunes after layers 18 and 24. `early` was
/// tuned on Gemma 3 270M (18 layers): it prunes after its global layers 5 and 11, where
/// every token is scored.
const PRESETS: &[(&str, &[(f32, f32)])] = &[
    ("off", &[]),
    ("conservative", &[(0.7, 0.5), (0.83, 0.5)]),
    ("default", &[(0.6, 0.5), (0.8, 0.5)]),
    ("aggressive", &[(0.6, 0.3), (0.8, 0.5)]),
    ("early", &[(0.3, 0.5), (0.6, 0.5)]),
];

pub const PRESET_NAMES: &str = "off, conservative, default, aggressive, early";

fn bad(reason: impl Into<String>) -> Error {
    Error::Invalid { field: "prune", reason: reason.into() }
}

impl Schedule {
    /// Dense inference.
    pub fn off() -> Self {
        Self { name: "off".into(), mode: Mode::Lazy, stages: vec![], maxpool: 1, sinks: 0, window: 1 }
    }

    pub fn is_dense(&self) -> bool {
        self.stages.is_empty()
    }

    /// Parses a preset name or a spec: `[lazy:|random:|static:]LAYER:KEEP,...` followed by
    /// options `+maxpool=K`, `+sinks=N` and `+window=W`, for example `18:0.5,24:0.5+sinks=4`.
    pub fn parse(spec: &str, num_layers: usize) -> Result<Self> {
        let spec = spec.trim();
        let mut parts = spec.split('+');
        let head = parts.next().unwrap_or("");
        let (mode, body) = match head.split_once(':') {
            Some(("lazy", rest)) => (Mode::Lazy, rest),
            Some(("random", rest)) => (Mode::Random, rest),
            Some(("static", rest)) => (Mode::Static, rest),
            _ => (Mode::Lazy, head),
        };
        let stages = if let Some((_, preset)) = PRESETS.iter().find(|(n, _)| *n == body) {
            preset
                .iter()
                .map(|&(depth, keep)| Stage { layer: ((depth * num_layers as f32).round() as usize).min(num_layers.saturating_sub(2)), keep })
                .collect()
        } else if body.contains(':') {
            body.split(',')
                .map(|s| {
                    let (l, k) = s.split_once(':').ok_or_else(|| bad(format!("stage {s:?} is not LAYER:KEEP")))?;
                    let layer = l.trim().parse::<usize>().map_err(|_| bad(format!("layer {l:?} is not a number")))?;
                    let keep = k.trim().parse::<f32>().map_err(|_| bad(format!("keep fraction {k:?} is not a number")))?;
                    Ok(Stage { layer, keep })
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            return Err(bad(format!("unknown preset {body:?} (presets: {PRESET_NAMES}; or LAYER:KEEP,...)")));
        };
        let mut schedule = Self { name: spec.to_string(), mode, stages, maxpool: 1, sinks: 0, window: 1 };
        for opt in parts {
            let (k, v) = opt.split_once('=').ok_or_else(|| bad(format!("option {opt:?} is not NAME=VALUE")))?;
            let v: usize = v.parse().map_err(|_| bad(format!("option {k} needs a whole number, got {v:?}")))?;
            match k {
                "maxpool" if v % 2 == 1 => schedule.maxpool = v,
                "maxpool" => return Err(bad("maxpool must be odd")),
                "sinks" => schedule.sinks = v,
                "window" if v >= 1 => schedule.window = v,
                "window" => return Err(bad("window must be at least 1")),
                _ => return Err(bad(format!("unknown option {k:?} (maxpool, sinks, window)"))),
            }
        }
        schedule.validate(num_layers)?;
        Ok(schedule)
    }

    fn validate(&self, num_layers: usize) -> Result<()> {
        for (i, s) in self.stages.iter().enumerate() {
            // Not `layer + 1`: a layer of usize::MAX would wrap past the check in release builds.
            if s.layer >= num_layers.saturating_sub(1) {
                return Err(bad(format!("pruning layer {} out of range: the model has layers 0..{} and the last cannot prune", s.layer, num_layers)));
            }
            if !(s.keep > 0.0 && s.keep <= 1.0) {
                return Err(bad(format!("keep fraction {} outside (0, 1]", s.keep)));
            }
            if i > 0 && s.layer <= self.stages[i - 1].layer {
                return Err(bad("pruning layers must be strictly increasing"));
            }
        }
        Ok(())
    }

    /// The keep fraction if `layer` prunes.
    pub fn keep_after(&self, layer: usize) -> Option<f32> {
        self.stages.iter().find(|s| s.layer == layer).map(|s| s.keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn presets_and_specs() -> Result<()> {
        let d = Schedule::parse("default", 30)?;
        assert_eq!(d.stages, vec![Stage { layer: 18, keep: 0.5 }, Stage { layer: 24, keep: 0.5 }]);
        assert!(Schedule::parse("off", 30)?.is_dense());
        let s = Schedule::parse("random:8:0.7,16:0.5,24:0.3+sinks=4+maxpool=5+window=16", 30)?;
        assert_eq!(s.mode, Mode::Random);
        assert_eq!(s.stages.len(), 3);
        assert_eq!((s.sinks, s.maxpool, s.window), (4, 5, 16));
        assert_eq!(Schedule::parse("static:default", 30)?.mode, Mode::Static);
        Ok(())
    }

    #[test]
    fn refuses_bad_schedules() {
        for (spec, why) in [
            ("30:0.5", "out of range"),
            ("29:0.5", "out of range"),
            ("10:0", "outside (0, 1]"),
            ("10:1.5", "outside (0, 1]"),
            ("20:0.5,10:0.5", "increasing"),
            ("fast", "unknown preset"),
            ("10:0.5+maxpool=4", "odd"),
            ("10:0.5+depth=3", "unknown option"),
            ("10:0.5+window=0", "at least 1"),
            ("x:0.5", "not a number"),
            ("18446744073709551615:0.5", "out of range"),
            ("18446744073709551616:0.5", "not a number"),
            ("10:NaN", "outside (0, 1]"),
            ("10:inf", "outside (0, 1]"),
            ("", "unknown preset"),
            ("lazy:", "unknown preset"),
            ("10:0.5,", "not LAYER:KEEP"),
            ("10:0.5+", "not NAME=VALUE"),
            ("10:0.5+sinks=-1", "whole number"),
        ] {
            let err = Schedule::parse(spec, 30).unwrap_err().to_string();
            assert!(err.contains(why) && err.contains("prune"), "{spec}: {err}");
        }
    }

    /// What every accepted schedule promises the engine.
    fn check_invariants(s: &Schedule, num_layers: usize) -> std::result::Result<(), TestCaseError> {
        for (i, stage) in s.stages.iter().enumerate() {
            prop_assert!(stage.layer.checked_add(1).is_some_and(|l| l < num_layers), "{:?}: layer {} of {num_layers}", s.name, stage.layer);
            prop_assert!(stage.keep > 0.0 && stage.keep <= 1.0, "{:?}: keep {}", s.name, stage.keep);
            prop_assert!(i == 0 || stage.layer > s.stages[i - 1].layer, "{:?}: not increasing", s.name);
        }
        prop_assert!(s.maxpool % 2 == 1 && s.window >= 1, "{:?}", s.name);
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn any_spec_is_refused_with_a_reason_or_keeps_the_invariants(
            spec in "((lazy|random|static|x):)?([0-9]{0,21}:[0-9.eEinfNa+-]{0,6},?){0,4}(\\+[a-z]{0,7}=?[0-9-]{0,21}){0,3}|\\PC{0,30}",
            num_layers in 0usize..64,
        ) {
            match Schedule::parse(&spec, num_layers) {
                Ok(s) => check_invariants(&s, num_layers)?,
                Err(e) => prop_assert!(e.to_string().starts_with("invalid prune: "), "{spec:?}: {e}"),
            }
        }

        #[test]
        fn presets_fit_every_depth(preset in proptest::sample::select(PRESET_NAMES.split(", ").collect::<Vec<_>>()), num_layers in 0usize..200) {
            if let Ok(s) = Schedule::parse(preset, num_layers) {
                check_invariants(&s, num_layers)?;
            }
            // A preset prunes at fractions of depth: any model deep enough takes it.
            prop_assert!(num_layers < 9 || Schedule::parse(preset, num_layers).is_ok(), "{preset} on {num_layers} layers");
        }

        #[test]
        fn written_specs_parse_back(
            num_layers in 2usize..100,
            stages in proptest::collection::btree_map(0usize..98, 1u32..=1000, 1..5),
            sinks in 0usize..1000,
        ) {
            let stages: Vec<Stage> = stages
                .into_iter()
                .filter(|&(l, _)| l + 1 < num_layers)
                .map(|(layer, k)| Stage { layer, keep: k as f32 / 1000.0 })
                .collect();
            prop_assume!(!stages.is_empty());
            let spec = stages.iter().map(|s| format!("{}:{}", s.layer, s.keep)).collect::<Vec<_>>().join(",");
            let parsed = Schedule::parse(&format!("static:{spec}+sinks={sinks}"), num_layers).unwrap();
            prop_assert_eq!(parsed.stages, stages);
            prop_assert_eq!((parsed.mode, parsed.sinks), (Mode::Static, sinks));
        }
    }
}
