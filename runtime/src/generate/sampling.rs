//! Generation options and the random numbers that drive the graph's in-graph token choice.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::contract::GenerationDefaults;
use crate::error::{Error, Result};
use crate::model::StepSampling;

/// Options of one generation. [`GenerateOptions::from_defaults`] takes the model file's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens to generate (at least 1).
    pub max_new_tokens: u32,
    /// Temperature; `<= 0` is greedy.
    pub temperature: f32,
    /// Top-k; `0` disables.
    pub top_k: u32,
    /// Top-p in `(0, 1]`; `1` disables.
    pub top_p: f32,
    /// Reseeds the session's random generator before this generation, so the same seed, prompt and
    /// options give the same tokens (with the same `rand` version: `StdRng`'s stream is not promised
    /// to stay the same across `rand` releases). `None` continues the session's generator.
    pub seed: Option<u64>,
    /// Generation stops when the text contains one of these (non-empty) strings; the output ends
    /// right before it.
    pub stop_strings: Vec<String>,
    /// Keep going past the model's stop ids (EOS, ...) until another condition ends the generation
    /// (benchmarks that need an exact token count). Stop tokens then appear in the output ids.
    pub ignore_stop_tokens: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self::from_defaults(&GenerationDefaults::default())
    }
}

impl GenerateOptions {
    /// Options from a model's generation defaults, no seed, no stop strings.
    pub fn from_defaults(d: &GenerationDefaults) -> Self {
        Self {
            max_new_tokens: d.max_new_tokens,
            temperature: d.temperature,
            top_k: d.top_k,
            top_p: d.top_p,
            seed: None,
            stop_strings: Vec::new(),
            ignore_stop_tokens: false,
        }
    }

    /// Checks ranges; every failure is an [`Error::InvalidArgument`].
    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == 0 {
            return Err(Error::InvalidArgument(
                "max_new_tokens must be at least 1".into(),
            ));
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::InvalidArgument(format!(
                "temperature must be finite and >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidArgument(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if let Some(i) = self.stop_strings.iter().position(|s| s.is_empty()) {
            return Err(Error::InvalidArgument(format!("stop string {i} is empty")));
        }
        Ok(())
    }

    /// The step controls for one step, with the uniform number `random_u` (and, when known, the one
    /// the next step will draw).
    pub fn step_sampling(&self, random_u: f32, next_random_u: Option<f32>) -> StepSampling {
        StepSampling {
            temperature: self.temperature,
            top_k: i64::from(self.top_k),
            top_p: self.top_p,
            random_u,
            next_random_u,
        }
    }
}

/// The session's seedable random generator (`rand`'s `StdRng`).
#[derive(Debug, Clone)]
pub struct SamplingRng(StdRng);

impl SamplingRng {
    /// Seeded from the operating system.
    pub fn from_entropy() -> Self {
        Self(StdRng::from_os_rng())
    }
    /// Seeded with `seed` (reproducible for a given `rand` version).
    pub fn seeded(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }
    /// A uniform number in `[0, 1)`.
    pub fn uniform(&mut self) -> f32 {
        // `random::<f32>()` is uniform in [0, 1).
        self.0.random::<f32>()
    }
    /// The number the next [`SamplingRng::uniform`] returns, without drawing it.
    pub fn peek(&self) -> f32 {
        self.clone().uniform()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_draws_repeat_and_stay_in_range() {
        let mut a = SamplingRng::seeded(42);
        let mut b = SamplingRng::seeded(42);
        let xs: Vec<f32> = (0..1000).map(|_| a.uniform()).collect();
        let ys: Vec<f32> = (0..1000).map(|_| b.uniform()).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mean = xs.iter().sum::<f32>() / 1000.0;
        assert!((mean - 0.5).abs() < 0.05, "mean {mean}");
        let mut c = SamplingRng::seeded(43);
        assert_ne!(xs[..8], (0..8).map(|_| c.uniform()).collect::<Vec<_>>()[..]);
    }

    #[test]
    fn validation() {
        let ok = GenerateOptions::default();
        ok.validate().unwrap();
        assert_eq!(ok.step_sampling(0.25, None).random_u, 0.25);
        for bad in [
            GenerateOptions {
                max_new_tokens: 0,
                ..ok.clone()
            },
            GenerateOptions {
                temperature: f32::NAN,
                ..ok.clone()
            },
            GenerateOptions {
                temperature: -1.0,
                ..ok.clone()
            },
            GenerateOptions {
                top_p: 0.0,
                ..ok.clone()
            },
            GenerateOptions {
                top_p: 1.5,
                ..ok.clone()
            },
            GenerateOptions {
                stop_strings: vec![String::new()],
                ..ok.clone()
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(Error::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }
}
