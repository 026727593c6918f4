//! Optimisers: Adam, AdamW (decoupled weight decay) and SGD, over groups of
//! parameters with their own learning rates.
//!
//! Adam follows PyTorch's update exactly (per-parameter step counts, bias
//! corrections, `eps` added after the square root), with β1 = 0 keeping no first
//! moment at all. On the CPU, f32/f64 parameters are updated by one fused pass that
//! reads the gradient and writes the parameter and its moments in place (candle's
//! own AdamW allocates several temporaries per tensor); other devices and dtypes
//! use the same formula through tensor ops.

use super::param::Param;
use crate::error::{Error, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::Arc;

/// The update rule and its hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Method {
    /// Adam; `decoupled` = true is AdamW (weight decay applied to the weights, not the gradient).
    Adam {
        /// First-moment decay (0 keeps no first moment).
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Added to the second moment's square root.
        eps: f64,
        /// AdamW's decoupled weight decay.
        decoupled: bool,
    },
    /// Plain SGD with optional (heavy-ball) momentum.
    Sgd {
        /// Heavy-ball momentum (0 for none).
        momentum: f64,
    },
}

/// Parameters sharing a learning rate and weight decay.
#[derive(Clone, Debug)]
pub struct ParamGroup {
    /// The parameters.
    pub params: Vec<Arc<Param>>,
    /// Their learning rate.
    pub lr: f64,
    /// Their weight decay.
    pub weight_decay: f64,
}

/// A moment buffer: plain host memory for the fused CPU path, a tensor otherwise.
#[derive(Clone, Debug)]
enum Buf {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Tensor(Tensor),
}

impl Buf {
    fn to_tensor(&self, like: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Buf::F32(v) => Tensor::from_slice(v, like.shape(), like.device())?,
            Buf::F64(v) => Tensor::from_slice(v, like.shape(), like.device())?,
            Buf::Tensor(t) => t.clone(),
        })
    }
}

#[derive(Clone, Debug, Default)]
struct ParamState {
    step: u64,
    /// Adam's first moment (absent when β1 = 0) or SGD's momentum buffer.
    m: Option<Buf>,
    /// Adam's second moment.
    v: Option<Buf>,
}

/// An optimiser over parameter groups.
#[derive(Debug)]
pub struct Optimizer {
    method: Method,
    groups: Vec<ParamGroup>,
    /// One state per parameter, in group order.
    states: Vec<Vec<ParamState>>,
}

#[derive(Clone, Copy)]
struct AdamHp {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    decoupled: bool,
    bias1: f64,
    bias2_sqrt: f64,
}

impl Optimizer {
    /// An optimiser over parameter groups.
    pub fn new(method: Method, groups: Vec<ParamGroup>) -> Result<Self> {
        if let Method::Adam { beta1, beta2, eps, .. } = method {
            if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) {
                return Err(Error::msg(format!("Adam betas must lie in [0, 1), got ({beta1}, {beta2})")));
            }
            if eps <= 0.0 {
                return Err(Error::msg(format!("Adam eps must be positive, got {eps}")));
            }
        }
        for g in &groups {
            if !(g.lr >= 0.0) || !(g.weight_decay >= 0.0) {
                return Err(Error::msg(format!(
                    "learning rate and weight decay must be >= 0, got lr {} wd {}",
                    g.lr, g.weight_decay
                )));
            }
        }
        let states = groups.iter().map(|g| vec![ParamState::default(); g.params.len()]).collect();
        Ok(Self { method, groups, states })
    }

    /// The update rule.
    pub fn method(&self) -> Method {
        self.method
    }

    /// The parameter groups.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// Every parameter, in group order.
    pub fn params(&self) -> impl Iterator<Item = &Arc<Param>> {
        self.groups.iter().flat_map(|g| g.params.iter())
    }

    /// Sets a group's learning rate.
    pub fn set_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        let n = self.groups.len();
        let g = self
            .groups
            .get_mut(group)
            .ok_or_else(|| Error::msg(format!("no parameter group {group} (there are {n})")))?;
        g.lr = lr;
        Ok(())
    }

    /// Clears every parameter's gradient.
    pub fn zero_grad(&self) {
        self.params().for_each(|p| p.zero_grad());
    }

    /// Number of updates applied to the first parameter that has been updated.
    pub fn step_count(&self) -> u64 {
        self.states.iter().flatten().map(|s| s.step).max().unwrap_or(0)
    }

    /// Applies one update to every parameter that has a gradient. On CUDA, Adam
    /// updates each group's f32 parameters in one launch.
    pub fn step(&mut self) -> Result<()> {
        for (group, states) in self.groups.iter().zip(self.states.iter_mut()) {
            // Adam's CUDA parameters, gathered for one launch over the group.
            let mut on_device: Vec<(usize, Tensor, AdamHp, crate::ops::adam::AdamTensor)> = vec![];
            for (i, (p, st)) in group.params.iter().zip(states.iter_mut()).enumerate() {
                let Some(grad) = p.grad() else { continue };
                st.step += 1;
                match self.method {
                    Method::Adam { beta1, beta2, eps, decoupled } => {
                        let hp = AdamHp {
                            lr: group.lr,
                            beta1,
                            beta2,
                            eps,
                            weight_decay: group.weight_decay,
                            decoupled,
                            bias1: 1.0 - beta1.powi(st.step as i32),
                            bias2_sqrt: (1.0 - beta2.powi(st.step as i32)).sqrt(),
                        };
                        match adam_device_item(p, &grad, st, hp)? {
                            Some(item) => on_device.push((i, grad, hp, item)),
                            None => adam_update(p, &grad, st, hp)?,
                        }
                    }
                    Method::Sgd { momentum } => sgd_update(p, &grad, st, group.lr, group.weight_decay, momentum)?,
                }
            }
            let Some((_, _, hp, _)) = on_device.first() else { continue };
            let shared = crate::ops::adam::AdamShared {
                beta1: hp.beta1,
                beta2: hp.beta2,
                eps: hp.eps,
                l2: if hp.decoupled { 0.0 } else { hp.weight_decay },
                shrink: if hp.decoupled { 1.0 - hp.lr * hp.weight_decay } else { 1.0 },
            };
            let items: Vec<_> = on_device.iter().map(|(_, _, _, item)| item.clone()).collect();
            if !crate::ops::adam::adam_step_group(&items, shared)? {
                for (i, grad, hp, _) in on_device {
                    adam_update(&group.params[i], &grad, &mut states[i], hp)?;
                }
            }
        }
        Ok(())
    }

    /// Per-parameter step counts, in group order.
    pub fn step_counts(&self) -> Vec<u64> {
        self.states.iter().flatten().map(|s| s.step).collect()
    }

    /// Restores moments (as written by [`Optimizer::state_tensors`]) and step counts.
    pub fn load_state(&mut self, tensors: &std::collections::HashMap<String, Tensor>, steps: &[u64]) -> Result<()> {
        let total: usize = self.states.iter().map(Vec::len).sum();
        if steps.len() != total {
            return Err(Error::msg(format!(
                "optimizer state holds {} parameters, this optimizer has {total}",
                steps.len()
            )));
        }
        let mut k = 0;
        for (gi, (group, states)) in self.groups.iter().zip(self.states.iter_mut()).enumerate() {
            for (pi, (p, st)) in group.params.iter().zip(states.iter_mut()).enumerate() {
                st.step = steps[k];
                k += 1;
                let restore = |key: String| -> Result<Option<Buf>> {
                    let Some(t) = tensors.get(&key) else { return Ok(None) };
                    if t.dims() != p.tensor().dims() {
                        return Err(Error::msg(format!(
                            "optimizer state {key}: shape {:?}, parameter {:?}",
                            t.dims(),
                            p.tensor().dims()
                        )));
                    }
                    let buf = zeros_like_buf(p.tensor())?;
                    Ok(Some(match buf {
                        Buf::F32(_) => Buf::F32(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?),
                        Buf::F64(_) => Buf::F64(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?),
                        Buf::Tensor(z) => Buf::Tensor(t.to_dtype(z.dtype())?.to_device(z.device())?),
                    }))
                };
                st.m = restore(format!("{gi}.{pi}.m"))?;
                st.v = restore(format!("{gi}.{pi}.v"))?;
            }
        }
        Ok(())
    }

    /// The optimiser's moment buffers as named tensors (`<group>.<index>.m|v`) and the
    /// per-parameter step counts, for checkpoints.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![];
        for (gi, (group, states)) in self.groups.iter().zip(&self.states).enumerate() {
            for (pi, (p, st)) in group.params.iter().zip(states).enumerate() {
                if let Some(m) = &st.m {
                    out.push((format!("{gi}.{pi}.m"), m.to_tensor(p.tensor())?));
                }
                if let Some(v) = &st.v {
                    out.push((format!("{gi}.{pi}.v"), v.to_tensor(p.tensor())?));
                }
            }
        }
        Ok(out)
    }
}

fn zeros_like_buf(p: &Tensor) -> Result<Buf> {
    Ok(match (p.device().is_cpu(), p.dtype()) {
        (true, DType::F32) => Buf::F32(vec![0.0; p.elem_count()]),
        (true, DType::F64) => Buf::F64(vec![0.0; p.elem_count()]),
        // Half-precision parameters keep their moments in f32.
        _ => Buf::Tensor(p.zeros_like()?.to_dtype(state_dtype(p.dtype()))?),
    })
}

/// The dtype Adam computes and keeps moments in: f32 for half-precision parameters,
/// whose range cannot hold g² or eps.
fn state_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// Allocates a parameter's moments on its first update.
fn ensure_adam_state(value: &Tensor, st: &mut ParamState, hp: AdamHp) -> Result<()> {
    if st.v.is_none() {
        st.v = Some(zeros_like_buf(value)?);
        if hp.beta1 > 0.0 {
            st.m = Some(zeros_like_buf(value)?);
        }
    }
    Ok(())
}

/// The parameter's part of its group's one-launch CUDA update, if it can take part
/// (an f32 CUDA parameter with its moments on the device; see `ops::adam`).
fn adam_device_item(
    p: &Param,
    grad: &Tensor,
    st: &mut ParamState,
    hp: AdamHp,
) -> Result<Option<crate::ops::adam::AdamTensor>> {
    let value = p.tensor();
    if !value.device().is_cuda() || value.dtype() != DType::F32 {
        return Ok(None);
    }
    ensure_adam_state(&value, st, hp)?;
    let (Some(Buf::Tensor(v)), m) = (&st.v, &st.m) else { return Ok(None) };
    let m = match m {
        Some(Buf::Tensor(m)) => Some(m.clone()),
        Some(_) => return Ok(None),
        None if hp.beta1 > 0.0 => return Ok(None),
        None => None,
    };
    let item = crate::ops::adam::AdamTensor {
        p: value.clone(),
        g: grad.to_dtype(DType::F32)?.contiguous()?,
        m,
        v: v.clone(),
        lr_hat: hp.lr / hp.bias1,
        bias2_sqrt: hp.bias2_sqrt,
    };
    Ok(item.fits().then_some(item))
}

fn adam_update(p: &Param, grad: &Tensor, st: &mut ParamState, hp: AdamHp) -> Result<()> {
    let value = p.tensor();
    ensure_adam_state(&value, st, hp)?;
    let grad = grad.to_dtype(value.dtype())?.contiguous()?;
    let fused = matches!(st.v, Some(Buf::F32(_)) | Some(Buf::F64(_))) && value.is_contiguous();
    if fused {
        let kernel = AdamKernel { state: RefCell::new(st), hp };
        return Ok(value.inplace_op2(&grad, &kernel)?);
    }
    // Tensor path (other accelerators, half precision): the same formula, op by op.
    let compute = state_dtype(value.dtype());
    let mut g = grad.to_dtype(compute)?;
    let mut new_p = value.to_dtype(compute)?;
    if hp.weight_decay != 0.0 && !hp.decoupled {
        g = (g + (&new_p * hp.weight_decay)?)?;
    }
    if hp.weight_decay != 0.0 && hp.decoupled {
        new_p = (new_p * (1.0 - hp.lr * hp.weight_decay))?;
    }
    let m = match st.m.take() {
        Some(Buf::Tensor(m)) => ((m * hp.beta1)? + (&g * (1.0 - hp.beta1))?)?,
        _ => g.clone(),
    };
    let v = match st.v.take() {
        Some(Buf::Tensor(v)) => ((v * hp.beta2)? + (g.sqr()? * (1.0 - hp.beta2))?)?,
        _ => return Err(Error::msg("Adam state lost its second moment")),
    };
    let denom = ((v.sqrt()? / hp.bias2_sqrt)? + hp.eps)?;
    new_p = (new_p - ((&m / denom)? * (hp.lr / hp.bias1))?)?;
    if hp.beta1 > 0.0 {
        st.m = Some(Buf::Tensor(m));
    }
    st.v = Some(Buf::Tensor(v));
    p.var().set(&new_p.to_dtype(value.dtype())?)?;
    Ok(())
}

/// One fused Adam pass over a contiguous CPU parameter, its gradient and its moments.
struct AdamKernel<'a> {
    state: RefCell<&'a mut ParamState>,
    hp: AdamHp,
}

/// Below this many elements a tensor is updated on one thread.
const PAR_CHUNK: usize = 1 << 15;

macro_rules! adam_slices {
    ($t:ty, $p:expr, $g:expr, $m:expr, $v:expr, $hp:expr) => {{
        let hp = $hp;
        let (lr, b1, b2, eps, wd) = (hp.lr as $t, hp.beta1 as $t, hp.beta2 as $t, hp.eps as $t, hp.weight_decay as $t);
        let step = (hp.lr / hp.bias1) as $t;
        let bc2 = hp.bias2_sqrt as $t;
        let l2 = if hp.decoupled { 0.0 as $t } else { wd };
        let shrink = if hp.decoupled { 1.0 as $t - lr * wd } else { 1.0 as $t };
        let one = 1.0 as $t;
        let p: &mut [$t] = $p;
        let g: &[$t] = $g;
        let v: &mut [$t] = $v;
        match $m {
            Some(m) => {
                let m: &mut [$t] = m;
                p.par_chunks_mut(PAR_CHUNK)
                    .zip(g.par_chunks(PAR_CHUNK))
                    .zip(m.par_chunks_mut(PAR_CHUNK))
                    .zip(v.par_chunks_mut(PAR_CHUNK))
                    .for_each(|(((p, g), m), v)| {
                        for i in 0..p.len() {
                            let gi = g[i] + l2 * p[i];
                            let mi = b1 * m[i] + (one - b1) * gi;
                            let vi = b2 * v[i] + (one - b2) * gi * gi;
                            m[i] = mi;
                            v[i] = vi;
                            p[i] = p[i] * shrink - step * mi / (vi.sqrt() / bc2 + eps);
                        }
                    });
            }
            None => {
                p.par_chunks_mut(PAR_CHUNK).zip(g.par_chunks(PAR_CHUNK)).zip(v.par_chunks_mut(PAR_CHUNK)).for_each(
                    |((p, g), v)| {
                        for i in 0..p.len() {
                            let gi = g[i] + l2 * p[i];
                            let vi = b2 * v[i] + (one - b2) * gi * gi;
                            v[i] = vi;
                            p[i] = p[i] * shrink - step * gi / (vi.sqrt() / bc2 + eps);
                        }
                    },
                );
            }
        }
    }};
}

impl candle_core::InplaceOp2 for AdamKernel<'_> {
    fn name(&self) -> &'static str {
        "fused-adam"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let (Some((p0, p1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("fused-adam needs contiguous tensors")
        };
        let mut st = self.state.borrow_mut();
        let st: &mut ParamState = &mut st;
        let m = st.m.as_mut();
        match (s1, s2, st.v.as_mut()) {
            (CpuStorage::F32(p), CpuStorage::F32(g), Some(Buf::F32(v))) => {
                let m = match m {
                    Some(Buf::F32(m)) => Some(m.as_mut_slice()),
                    _ => None,
                };
                adam_slices!(f32, &mut p[p0..p1], &g[g0..g1], m, v.as_mut_slice(), self.hp)
            }
            (CpuStorage::F64(p), CpuStorage::F64(g), Some(Buf::F64(v))) => {
                let m = match m {
                    Some(Buf::F64(m)) => Some(m.as_mut_slice()),
                    _ => None,
                };
                adam_slices!(f64, &mut p[p0..p1], &g[g0..g1], m, v.as_mut_slice(), self.hp)
            }
            (p, _, _) => candle_core::bail!("fused-adam: unsupported dtype {:?}", p.dtype()),
        }
        Ok(())
    }
}

fn sgd_update(p: &Param, grad: &Tensor, st: &mut ParamState, lr: f64, wd: f64, momentum: f64) -> Result<()> {
    let value = p.tensor();
    let mut g = grad.to_dtype(value.dtype())?;
    if wd != 0.0 {
        g = (g + (value * wd)?)?;
    }
    if momentum != 0.0 {
        g = match st.m.take() {
            Some(Buf::Tensor(b)) => ((b * momentum)? + g)?,
            _ => g,
        };
        st.m = Some(Buf::Tensor(g.clone()));
    }
    p.var().set(&(value - (g * lr)?)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Adam written out step by step in f64, as PyTorch's `torch.optim.Adam(W)` does it.
    fn reference_adam(
        p0: &[f64],
        grads: &[Vec<f64>],
        lr: f64,
        b1: f64,
        b2: f64,
        eps: f64,
        wd: f64,
        decoupled: bool,
    ) -> Vec<f64> {
        let mut p = p0.to_vec();
        let mut m = vec![0.0; p.len()];
        let mut v = vec![0.0; p.len()];
        for (t, g) in grads.iter().enumerate() {
            let t = (t + 1) as i32;
            for i in 0..p.len() {
                let mut gi = g[i];
                if decoupled {
                    p[i] *= 1.0 - lr * wd;
                } else {
                    gi += wd * p[i];
                }
                m[i] = b1 * m[i] + (1.0 - b1) * gi;
                v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                let denom = v[i].sqrt() / (1.0 - b2.powi(t)).sqrt() + eps;
                p[i] -= lr / (1.0 - b1.powi(t)) * m[i] / denom;
            }
        }
        p
    }

    fn run(dev: &Device, dtype: DType, b1: f64, wd: f64, decoupled: bool) -> Result<(Vec<f64>, Vec<f64>)> {
        let p0: Vec<f64> = (0..7).map(|i| (i as f64 - 3.0) * 0.37).collect();
        let grads: Vec<Vec<f64>> = (0..5).map(|s| (0..7).map(|i| ((i * 3 + s) as f64).sin()).collect()).collect();
        let p = Param::new(&Tensor::new(p0.as_slice(), dev)?.to_dtype(dtype)?, "p")?;
        let method = Method::Adam { beta1: b1, beta2: 0.999, eps: 1e-8, decoupled };
        let mut opt = Optimizer::new(method, vec![ParamGroup { params: vec![p.clone()], lr: 0.01, weight_decay: wd }])?;
        for g in &grads {
            p.set_grad(Some(Tensor::new(g.as_slice(), dev)?.to_dtype(dtype)?))?;
            opt.step()?;
        }
        let got = p.tensor().to_dtype(DType::F64)?.to_vec1::<f64>()?;
        Ok((got, reference_adam(&p0, &grads, 0.01, b1, 0.999, 1e-8, wd, decoupled)))
    }

    #[test]
    fn fused_and_tensor_paths_match_the_reference() -> Result<()> {
        for &(b1, wd, dec) in &[(0.9, 0.0, false), (0.0, 0.0, false), (0.9, 0.01, true), (0.0, 0.1, false)] {
            let (got, want) = run(&Device::Cpu, DType::F64, b1, wd, dec)?; // fused
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-12, "f64 fused b1={b1} wd={wd}: {a} vs {b}");
            }
            let (got, want) = run(&Device::Cpu, DType::F32, b1, wd, dec)?;
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "f32 fused b1={b1}: {a} vs {b}");
            }
            let (got, want) = run(&Device::Cpu, DType::F16, b1, wd, dec)?; // tensor path
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 5e-3, "f16 tensor path b1={b1}: {a} vs {b}");
            }
        }
        Ok(())
    }

    #[test]
    fn params_without_gradient_are_left_alone() -> Result<()> {
        let a = Param::new(&Tensor::new(&[1.0f32, 2.0], &Device::Cpu)?, "a")?;
        let b = Param::new(&Tensor::new(&[3.0f32], &Device::Cpu)?, "b")?;
        let m = Method::Sgd { momentum: 0.0 };
        let mut opt =
            Optimizer::new(m, vec![ParamGroup { params: vec![a.clone(), b.clone()], lr: 0.5, weight_decay: 0.0 }])?;
        a.set_grad(Some(Tensor::new(&[1.0f32, -2.0], &Device::Cpu)?))?;
        opt.step()?;
        assert_eq!(a.tensor().to_vec1::<f32>()?, vec![0.5, 3.0]);
        assert_eq!(b.tensor().to_vec1::<f32>()?, vec![3.0]);
        Ok(())
    }
}
