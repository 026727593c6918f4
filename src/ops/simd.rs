//! Vectorised math for the CPU kernels: the `Real` trait (f32/f64) with an f32 exp
//! and erf that vectorise (no libm calls in the loop), loops compiled for the
//! widest vector unit the CPU has, and reductions in independent lanes.

use candle_core::WithDType;

/// Runs `f` compiled for the widest vector unit the CPU has (AVX-512, else AVX2
/// with FMA, else the build's baseline): the elementwise kernels' loops vectorise,
/// but the default x86-64 target only allows 4-wide SSE2. `f` should be an
/// `#[inline(always)]` closure so that its body is compiled inside.
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::is_x86_feature_detected!("avx512f") {
            // Safety: the CPU has the features these functions are compiled for.
            return unsafe { avx512(f) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // Safety: as above.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// The element types of the CPU kernels, f32 and f64, with the math they need
/// (`WithDType` gives `from_f64`).
pub trait Real:
    WithDType
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + PartialOrd
{
    /// 0.
    const ZERO: Self;
    /// `n` as this type.
    fn from_usize(n: usize) -> Self;
    /// The square root.
    fn sqrt(self) -> Self;
    /// eˣ.
    fn exp(self) -> Self;
    /// The error function.
    fn erf(self) -> Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    fn from_usize(n: usize) -> Self {
        n as f32
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    /// A branch-free polynomial (Cephes' expf: x = n·ln2 + r, |r| ≤ ln2/2, degree 7 in
    /// r, 2ⁿ from the exponent bits), within 2 ulp of libm's, so loops over it
    /// vectorise; x is clamped to [−87, 88] (results stay normal), NaN stays NaN.
    /// Fused multiply-adds (`mul_add`): inside `vectorized` the CPU's FMA
    /// instructions, a third fewer operations than a multiply and an add each (the
    /// softmax of CPU attention is mostly this exp); elsewhere libm's `fmaf`, which
    /// rounds the same, so both give the same values.
    #[inline(always)]
    fn exp(self) -> Self {
        const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer.
        let x = self.clamp(-87.0, 88.0);
        let t = x * std::f32::consts::LOG2_E + MAGIC;
        let n = t - MAGIC;
        let r = n.mul_add(2.121_944_4e-4, n.mul_add(-0.693_359_4, x));
        let p = [1.987_569_1e-4f32, 1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];
        let poly = p.iter().fold(0.0, |acc: f32, &c| acc.mul_add(r, c));
        let two_n = f32::from_bits(((t.to_bits() as i32 - 0x4B40_0000 + 127) << 23) as u32);
        (poly * r).mul_add(r, r + 1.0) * two_n
    }
    /// A rational approximation (odd degree 13 over even degree 8, on x clamped to
    /// ±4 where erf is ±1 in f32): no exp, so it vectorises; within 1e-6 of libm's.
    /// Horner steps as fused multiply-adds, as in `exp`.
    fn erf(self) -> Self {
        let x = self.clamp(-4.0, 4.0);
        let x2 = x * x;
        let p = [
            -2.72614225801306e-10f32,
            2.77068142495902e-08,
            -2.10102402082508e-06,
            -5.69250639462346e-05,
            -7.34990630326855e-04,
            -2.95459980854025e-03,
            -1.60960333262415e-02,
        ];
        let q = [
            -1.45660718464996e-05f32,
            -2.13374055278905e-04,
            -1.68282697438203e-03,
            -7.37332916720468e-03,
            -1.42647390514189e-02,
        ];
        let num = p.iter().fold(0.0, |acc: f32, &c| acc.mul_add(x2, c)) * x;
        let den = q.iter().fold(0.0, |acc: f32, &c| acc.mul_add(x2, c));
        num / den
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    fn from_usize(n: usize) -> Self {
        n as f64
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn erf(self) -> Self {
        libm::erf(self)
    }
}

/// Independent accumulators per reduction, so that the loop vectorises.
pub const LANES: usize = 16;

/// Folds `row` with `op` through `LANES` accumulators started at `init`.
#[inline(always)]
pub fn lane_fold<T: Real>(row: &[T], init: T, op: impl Fn(T, T) -> T) -> T {
    let mut acc = [init; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = op(*a, v);
        }
    }
    let folded = acc.iter().fold(init, |a, &b| op(a, b));
    tail.iter().fold(folded, |a, &b| op(a, b))
}

/// Σ f(aᵢ, bᵢ) over paired slices (to the shorter's length) through `LANES`
/// accumulators, so that the loop vectorises. One sum per pass: a pass that keeps
/// two sums (f returning a pair) is vectorised across the pair instead of across the
/// lanes — two-wide, with the accumulators spilled — and took twice as long as two
/// passes over the same (cached) row.
#[inline(always)]
pub fn lane_sum_zip<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    let len = a.len().min(b.len());
    let mut acc = [T::ZERO; LANES];
    let (ca, cb) = (a[..len].chunks_exact(LANES), b[..len].chunks_exact(LANES));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (ca, cb) in ca.zip(cb) {
        for ((s, &x), &y) in acc.iter_mut().zip(ca).zip(cb) {
            *s += f(x, y);
        }
    }
    let sum = acc.iter().fold(T::ZERO, |s, &v| s + v);
    ta.iter().zip(tb).fold(sum, |s, (&x, &y)| s + f(x, y))
}

/// Maps `row` in place by `f` and returns the sum of the new values, through
/// `LANES` accumulators (one pass where a map and a `lane_sum` would take two).
#[inline(always)]
pub fn lane_map_sum<T: Real>(row: &mut [T], f: impl Fn(T) -> T) -> T {
    let mut acc = [T::ZERO; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *v = f(*v);
            *a = *a + *v;
        }
    }
    let sum = acc.iter().fold(T::ZERO, |s, &v| s + v);
    chunks.into_remainder().iter_mut().fold(sum, |s, v| {
        *v = f(*v);
        s + *v
    })
}

/// Σ f(v) over `row` through `LANES` accumulators, so that the loop vectorises.
#[inline(always)]
pub fn lane_sum<T: Real>(row: &[T], f: impl Fn(T) -> T) -> T {
    lane_sum_zip(row, row, |v, _| f(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f32 polynomial exp stays within 2 ulp of libm's over the range it
    /// serves, keeps NaN, and saturates to normal numbers outside it.
    #[test]
    fn f32_exp_is_within_two_ulp() {
        let worst = (-86_990..=87_990)
            .map(|i| i as f32 * 1e-3)
            .map(|x| ((Real::exp(x) - x.exp()) / x.exp()).abs())
            .fold(0f32, f32::max);
        assert!(worst < 2.0 * f32::EPSILON, "relative error {worst}");
        assert!(Real::exp(f32::NAN).is_nan());
        assert!(Real::exp(-1e4f32).is_normal() && Real::exp(-1e4f32) < 1e-37);
        assert!(Real::exp(1e4f32).is_finite());
    }

    /// The f32 erf approximation stays within 1e-6 of libm's.
    #[test]
    fn f32_erf_is_within_1e6_of_libm() {
        let worst =
            (-6000..=6000).map(|i| i as f32 * 1e-3).map(|x| (Real::erf(x) - libm::erff(x)).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-6, "erf approximation off by {worst}");
    }

    /// Lane folds equal plain folds for rows shorter and longer than the lanes.
    #[test]
    fn lane_fold_equals_fold() {
        for n in [0usize, 1, 15, 16, 17, 100] {
            let row: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
            let sum = lane_fold(&row, 0.0, |a, b| a + b);
            assert!((sum - row.iter().sum::<f64>()).abs() < 1e-12, "{n}");
        }
    }

    /// Lane sums equal plain sums of the mapped values, over all of a pair of slices
    /// (rows shorter and longer than the lanes) and to the shorter one's length.
    #[test]
    fn lane_sums_equal_plain_sums() {
        for n in [0usize, 1, 15, 16, 17, 100] {
            let a: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
            let b: Vec<f64> = (0..n + 3).map(|i| (i as f64 * 0.11).cos()).collect();
            let s = lane_sum_zip(&a, &b, |x, y| x * y - y);
            let e = a.iter().zip(&b).fold(0.0, |p, (x, y)| p + x * y - y);
            assert!((s - e).abs() < 1e-12, "{n}");
            let s = lane_sum_zip(&b, &a, |y, x| x * y - y);
            assert!((s - e).abs() < 1e-12, "{n}: the shorter slice second");
            let squares = lane_sum(&a, |x| x * x);
            assert!((squares - a.iter().map(|x| x * x).sum::<f64>()).abs() < 1e-12, "{n}");
            let mut mapped = a.clone();
            let sum = lane_map_sum(&mut mapped, |x| x * x - 1.0);
            assert!(mapped.iter().zip(&a).all(|(m, x)| *m == x * x - 1.0), "{n}: mapped in place");
            assert!((sum - a.iter().map(|x| x * x - 1.0).sum::<f64>()).abs() < 1e-12, "{n}");
        }
    }
}
