//! The seeded random generator behind every random tensor of a run.
//!
//! candle's CPU backend cannot be seeded, so sidscript draws every random number
//! itself, on the host, from a ChaCha stream, and moves the result to the device.
//! The same seed gives the same numbers on every device, and the generator's
//! position can be saved and restored (exact resume).
//!
//! Per-sample streams (data parallelism): between [`Generator::per_sample`] and
//! [`Generator::sequential`], every draw is taken row by row along its first
//! dimension, and row i's numbers come from a ChaCha stream keyed by (seed, block
//! key, draw number in the block, `first + i`) — not from the sequential stream,
//! which does not move. So N ranks that each draw b rows starting at rank·b give
//! the same samples as one process drawing N·b rows, and a run can resume on
//! another number of ranks.

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
    rows: Option<RowStreams>,
}

/// Where per-sample draws come from: the block's key, this process's first global
/// row, and how many draws the block has made.
#[derive(Clone, Copy, Debug)]
struct RowStreams {
    key: u64,
    first: u64,
    draws: u64,
}

/// ChaCha words reserved for one row of one draw (2^24: 16 M words).
const ROW_WORDS_LOG2: u32 = 24;

/// SplitMix64's finaliser: a well-mixed 64-bit value from two.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_add(0x9e37_79b9_7f4a_7c15).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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
        Self { seed, rng: ChaCha8Rng::seed_from_u64(seed), rows: None }
    }

    /// From now on, draws are per sample (see the module doc): block `key`, this
    /// process's rows starting at global row `first`. Blocks with different keys
    /// draw independent numbers; the sequential stream does not move.
    pub fn per_sample(&mut self, key: u64, first: u64) {
        self.rows = Some(RowStreams { key, first, draws: 0 });
    }

    /// Back to the sequential stream.
    pub fn sequential(&mut self) {
        self.rows = None;
    }

    /// `n` values for each of `rows` rows (or n·rows from the sequential stream),
    /// row after row.
    fn draw<T>(&mut self, rows: usize, n: usize, f: impl Fn(&mut ChaCha8Rng) -> T) -> Result<Vec<T>> {
        let Some(r) = self.rows.as_mut() else {
            return Ok((0..rows * n).map(|_| f(&mut self.rng)).collect());
        };
        if n as u128 >= 1u128 << (ROW_WORDS_LOG2 - 2) {
            return Err(Error::msg(format!(
                "per-sample draw: {n} values in one row is more than a row's stream holds"
            )));
        }
        let stream = mix(r.key, r.draws);
        r.draws += 1;
        let mut out = Vec::with_capacity(rows * n);
        for i in 0..rows as u64 {
            let mut row = ChaCha8Rng::seed_from_u64(self.seed);
            row.set_stream(stream);
            row.set_word_pos(((r.first + i) as u128) << ROW_WORDS_LOG2);
            out.extend((0..n).map(|_| f(&mut row)));
        }
        Ok(out)
    }

    /// Rows along the first dimension (a scalar shape is one row) and values per row.
    fn rows_of(shape: &Shape) -> (usize, usize) {
        match shape.dims().first() {
            Some(&0) => (0, 0),
            Some(&r) => (r, shape.elem_count() / r),
            None => (1, 1),
        }
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
        // Per-sample mode is not part of the state: checkpoints are taken between blocks.
        g.rng.set_word_pos(state.word_pos);
        g
    }

    /// Standard normal samples of the given shape.
    pub fn randn(&mut self, shape: impl Into<Shape>, dtype: DType, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let (rows, n) = Self::rows_of(&shape);
        let t = match dtype {
            DType::F64 => {
                let v: Vec<f64> = self.draw(rows, n, |r| StandardNormal.sample(r))?;
                Tensor::from_vec(v, shape, &Device::Cpu)?
            }
            _ => {
                let v: Vec<f32> = self.draw(rows, n, |r| StandardNormal.sample(r))?;
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
        let (rows, n) = Self::rows_of(&shape);
        let t = match dtype {
            DType::F64 => {
                let v: Vec<f64> = self.draw(rows, n, |r| r.random_range(lo..hi))?;
                Tensor::from_vec(v, shape, &Device::Cpu)?
            }
            _ => {
                let (lo, hi) = (lo as f32, hi as f32);
                let v: Vec<f32> = self.draw(rows, n, |r| r.random_range(lo..hi))?;
                Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(float_dtype(dtype)?)?
            }
        };
        Ok(t.to_device(device)?)
    }

    /// Integers drawn uniformly from `[lo, hi)`, one per row.
    pub fn randint(&mut self, n: usize, lo: i64, hi: i64) -> Result<Vec<i64>> {
        if lo >= hi {
            return Err(Error::msg(format!("randint: empty range [{lo}, {hi})")));
        }
        self.draw(n, 1, |r| r.random_range(lo..hi))
    }

    /// Uniform floats in `[0, 1)`, one per row.
    pub fn uniforms(&mut self, n: usize) -> Result<Vec<f64>> {
        self.draw(n, 1, |r| r.random())
    }

    /// A uniform float in `[0, 1)` from the sequential stream (also between
    /// `per_sample` and `sequential`: a scalar belongs to no sample).
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

    /// Two processes drawing 2 rows each from rows 0 and 2 get what one process
    /// drawing 4 rows gets, draw after draw, and the sequential stream does not move.
    #[test]
    fn per_sample_draws_do_not_depend_on_how_rows_are_split() -> Result<()> {
        let dev = Device::Cpu;
        let draws = |g: &mut Generator, rows: usize| -> Result<(Vec<f32>, Vec<i64>, Vec<f64>, Vec<f64>)> {
            let noise = g.randn((rows, 3, 2), DType::F32, &dev)?.flatten_all()?.to_vec1::<f32>()?;
            let ints = g.randint(rows, 0, 1000)?;
            let u = g.uniforms(rows)?;
            let r = g.rand((rows, 2), -1.0, 1.0, DType::F64, &dev)?.flatten_all()?.to_vec1::<f64>()?;
            Ok((noise, ints, u, r))
        };
        let mut one = Generator::new(3);
        let before = one.state();
        one.per_sample(11, 0);
        let whole = draws(&mut one, 4)?;
        one.sequential();
        assert_eq!(one.state(), before, "per-sample draws leave the sequential stream where it was");
        let (mut a, mut b) = (Generator::new(3), Generator::new(3));
        a.per_sample(11, 0);
        b.per_sample(11, 2);
        let (ha, hb) = (draws(&mut a, 2)?, draws(&mut b, 2)?);
        assert_eq!([ha.0, hb.0].concat(), whole.0);
        assert_eq!([ha.1, hb.1].concat(), whole.1);
        assert_eq!([ha.2, hb.2].concat(), whole.2);
        assert_eq!([ha.3, hb.3].concat(), whole.3);
        // Another block key, or the sequential stream, gives other numbers.
        let mut c = Generator::new(3);
        c.per_sample(12, 0);
        assert_ne!(draws(&mut c, 4)?.0, whole.0);
        assert_ne!(draws(&mut Generator::new(3), 4)?.0, whole.0);
        Ok(())
    }
}
