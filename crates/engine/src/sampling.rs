//! Token sampling: greedy, temperature, top-k, top-p, seeded.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use lazyserve_request::SamplingParams;

use crate::Result;

/// Picks tokens from logits; deterministic for a given seed.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Self { params, rng })
    }

    /// The sampler as it stands after `sampled` tokens were drawn with these params: how a
    /// decode worker continues the sequence a prefill worker started.
    pub fn after(params: SamplingParams, sampled: usize) -> Result<Self> {
        let mut s = Self::new(params)?;
        if !s.is_greedy() {
            for _ in 0..sampled {
                s.rng.random::<f32>();
            }
        }
        Ok(s)
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    fn is_greedy(&self) -> bool {
        self.params.temperature == 0.0 || self.params.top_k == 1
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let greedy = || {
            logits
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best })
                .0 as u32
        };
        if self.is_greedy() {
            return greedy();
        }
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        let k = if self.params.top_k == 0 { logits.len() } else { self.params.top_k.min(logits.len()) };
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, by_logit);
            idx.truncate(k);
        }
        idx.sort_unstable_by(by_logit);
        let t = self.params.temperature;
        let top = logits[idx[0] as usize];
        let mut probs: Vec<f32> = idx.iter().map(|&i| ((logits[i as usize] - top) / t).exp()).collect();
        let z: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
        if self.params.top_p < 1.0 {
            let mut cum = 0.0;
            let keep = probs.iter().position(|&p| {
                cum += p;
                cum >= self.params.top_p
            });
            let keep = keep.map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (p, &i) in probs.iter().zip(&idx) {
            r -= p;
            if r <= 0.0 {
                return i;
            }
        }
        idx[probs.len() - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_argmax() -> Result<()> {
        let mut s = Sampler::new(SamplingParams::default())?;
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
        Ok(())
    }

    #[test]
    fn top_k_and_top_p_restrict_the_choice() -> Result<()> {
        let logits = [5.0, 4.9, 0.0, -3.0, 4.8];
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: 2, seed: 7, ..Default::default() })?;
        for _ in 0..200 {
            assert!(matches!(s.sample(&logits), 0 | 1));
        }
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.3, seed: 7, ..Default::default() })?;
        for _ in 0..200 {
            assert_eq!(s.sample(&logits), 0);
        }
        Ok(())
    }

    #[test]
    fn same_seed_same_tokens() -> Result<()> {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let p = SamplingParams { temperature: 0.9, seed: 42, ..Default::default() };
        let (mut a, mut b) = (Sampler::new(p.clone())?, Sampler::new(p)?);
        let xs: Vec<u32> = (0..20).map(|_| a.sample(&logits)).collect();
        let ys: Vec<u32> = (0..20).map(|_| b.sample(&logits)).collect();
        assert_eq!(xs, ys);
        Ok(())
    }

    #[test]
    fn after_continues_where_another_sampler_stopped() -> Result<()> {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let p = SamplingParams { temperature: 0.9, seed: 3, ..Default::default() };
        let mut whole = Sampler::new(p.clone())?;
        let xs: Vec<u32> = (0..12).map(|_| whole.sample(&logits)).collect();
        let mut first = Sampler::new(p.clone())?;
        let mut ys = vec![first.sample(&logits)];
        let mut rest = Sampler::after(p, 1)?;
        ys.extend((0..11).map(|_| rest.sample(&logits)));
        assert_eq!(xs, ys);
        Ok(())
    }

    #[test]
    fn refuses_bad_values() {
        for p in [
            SamplingParams { temperature: -0.1, ..Default::default() },
            SamplingParams { temperature: f32::NAN, ..Default::default() },
            SamplingParams { top_p: 0.0, ..Default::default() },
            SamplingParams { top_p: 1.5, ..Default::default() },
        ] {
            assert!(Sampler::new(p).is_err());
        }
    }
}
