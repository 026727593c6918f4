//! The seeded random generator behind every random tensor of a run.
//!
//! candle's CPU backend cannot be seeded, so sidscript draws every random number
//! itself, on the host, from a ChaCha stream, and moves the result to the device.
//! The same seed gives the same numbers on every device, and the generator's
//! position can be saved and restored (exact resume).

use crate::error::{Error, Result};
use candle_core::{DType, Device, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// A reproducible source of random tensors.
#[derive(Clone, Debug)]
pub struct Generator {
    seed: u64,
    rng: ChaCha8Rng,
}

/// What it takes to put a [`Generator`] back exactly where it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GeneratorState {
    /// The seed.
    pub seed: u64,
    /// Position in the ChaCha stream, in 32-bit words (a u128 written as a string in JSON).
    #[serde(with = "u128_string")]
    pub word_pos: u128,
}

impl Generator {
    /// A generator at the start of `seed`'s stream.
    pub fn new(seed: u64) -> Self {
        Self { seed, rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Where the generator is, for a checkpoint.
    pub fn state(&self) -> GeneratorState {
        GeneratorState { seed: self.seed, word_pos: self.rng.get_word_pos() }
    }

    /// The generator at a saved position.
    pub fn from_state(state: GeneratorState) -> Self {
        let mut g = Self::new(state.seed);
        g.rng.set_word_pos(state.word_pos);
        g
    }

    /// Standard normal samples of the given shape.
    pub fn randn(&mut self, shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let n = shape.elem_count();
        let t = match dtype {
            DType::F64 => {
                let v: Vec<f64> = (0..n).map(|_| StandardNormal.sample(&mut self.rng)).collect();
                Tensor::from_vec(v, shape, &Device::Cpu)?
            }
            _ => {
                let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut self.rng)).collect();
                Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(float_dtype(dtype)?)?
            }
        };
        Ok(t.to_device(device)?)
    }

    /// Uniform samples in `[lo, hi)`.
    pub fn rand(&mut self, shape: impl Into<Shape>, lo: f64, hi: f64, dtype: DType, device: &Device) -> Result<Tensor> {
        if !(lo < hi) {
            return Err(Error::msg(format!("rand: empty range [{lo}, {hi})")));
        }
        let shape = shape.into();
        let n = shape.elem_count();
        let t = match dtype {
            DType::F64 => {
                let v: Vec<f64> = (0..n).map(|_| self.rng.random_range(lo..hi)).collect();
                Tensor::from_vec(v, shape, &Device::Cpu)?
            }
            _ => {
                let (lo, hi) = (lo as f32, hi as f32);
                let v: Vec<f32> = (0..n).map(|_| self.rng.random_range(lo..hi)).collect();
                Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(float_dtype(dtype)?)?
            }
        };
        Ok(t.to_device(device)?)
    }

    /// Integers drawn uniformly from `[lo, hi)`.
    pub fn randint(&mut self, n: usize, lo: i64, hi: i64) -> Result<Vec<i64>> {
        if lo >= hi {
            return Err(Error::msg(format!("randint: empty range [{lo}, {hi})")));
        }
        Ok((0..n).map(|_| self.rng.random_range(lo..hi)).collect())
    }

    /// A uniform float in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        self.rng.random()
    }
}

fn float_dtype(dtype: DType) -> Result<DType> {
    match dtype {
        DType::F16 | DType::BF16 | DType::F32 | DType::F64 => Ok(dtype),
        other => Err(Error::msg(format!("random tensors must be floating point, not {other:?}"))),
    }
}

mod u128_string {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &u128, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u128, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_numbers_and_state_resumes() -> Result<()> {
        let mut a = Generator::new(7);
        let mut b = Generator::new(7);
        let x = a.randn(16, DType::F32, &Device::Cpu)?.to_vec1::<f32>()?;
        let y = b.randn(16, DType::F32, &Device::Cpu)?.to_vec1::<f32>()?;
        assert_eq!(x, y);
        let saved = a.state();
        let next = a.randn(8, DType::F32, &Device::Cpu)?.to_vec1::<f32>()?;
        let mut c = Generator::from_state(saved);
        assert_eq!(next, c.randn(8, DType::F32, &Device::Cpu)?.to_vec1::<f32>()?);
        let mut d = Generator::new(8);
        assert_ne!(x, d.randn(16, DType::F32, &Device::Cpu)?.to_vec1::<f32>()?);
        Ok(())
    }
}
