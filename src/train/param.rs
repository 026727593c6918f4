//! Trainable parameters with PyTorch-like gradient slots, and trainable copies of
//! models ([`trainable_copy`]).
//!
//! A [`Param`] owns a candle `Var` and a gradient slot. `backward(loss)` runs
//! candle's backprop once and *adds* each parameter's gradient to its slot, so
//! several backward calls accumulate (gradient accumulation) until the slots are
//! zeroed. Parameters find their slot through a process-wide registry keyed by
//! the tensor id, holding weak references only: dropping the last handle of a
//! parameter frees it and removes its entry.

use crate::diffusion::model::Component;
use crate::error::{Error, Result};
use candle_core::{Tensor, TensorId, Var};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};

static REGISTRY: LazyLock<Mutex<HashMap<TensorId, Weak<Param>>>> = LazyLock::new(Default::default);

fn registry() -> MutexGuard<'static, HashMap<TensorId, Weak<Param>>> {
    lock(&REGISTRY)
}

/// Locks `m`, poisoned or not: every write under these locks is one move of a whole
/// value (a map entry, a name, a gradient computed before the slot is touched), so a
/// panic elsewhere while one was held cannot have left it half-written.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A trainable tensor and its accumulated gradient.
#[derive(Debug)]
pub struct Param {
    var: Var,
    name: Mutex<String>,
    grad: Mutex<Option<Tensor>>,
}

impl Param {
    /// A new parameter holding a copy of `value`.
    pub fn new(value: &Tensor, name: impl Into<String>) -> Result<Arc<Self>> {
        // Backprop never reaches an integer tensor: such a parameter would stay
        // at its value silently.
        if !value.dtype().is_float() {
            return Err(Error::msg(format!(
                "a parameter must be a float tensor (gradients do not reach integers), got {}",
                value.dtype().as_str()
            )));
        }
        Ok(Self::from_var(Var::from_tensor(&value.detach())?, name))
    }

    /// Wraps an existing `Var` (its storage is shared, not copied).
    pub fn from_var(var: Var, name: impl Into<String>) -> Arc<Self> {
        let p = Arc::new(Self { var, name: Mutex::new(name.into()), grad: Mutex::new(None) });
        registry().insert(p.var.as_tensor().id(), Arc::downgrade(&p));
        p
    }

    /// The live tensor; ops on it are tracked for backprop.
    pub fn tensor(&self) -> &Tensor {
        self.var.as_tensor()
    }

    /// The underlying candle variable.
    pub fn var(&self) -> &Var {
        &self.var
    }

    /// Its name (a weight name in a model).
    pub fn name(&self) -> String {
        lock(&self.name).clone()
    }

    /// Renames it.
    pub fn set_name(&self, name: &str) {
        *lock(&self.name) = name.to_string();
    }

    /// The accumulated gradient, if any backward reached this parameter.
    pub fn grad(&self) -> Option<Tensor> {
        lock(&self.grad).clone()
    }

    /// Replaces the accumulated gradient.
    pub fn set_grad(&self, grad: Option<Tensor>) -> Result<()> {
        if let Some(g) = &grad {
            check_same_shape(self.tensor(), g, "gradient")?;
        }
        *lock(&self.grad) = grad;
        Ok(())
    }

    /// Clears the accumulated gradient.
    pub fn zero_grad(&self) {
        *lock(&self.grad) = None;
    }

    /// Adds `g` to the gradient slot.
    pub fn accumulate_grad(&self, g: &Tensor) -> Result<()> {
        let g = g.detach();
        let mut slot = lock(&self.grad);
        // The sum first: a failed add leaves the slot as it was.
        let sum = match slot.as_ref() {
            Some(old) => (old + g)?,
            None => g,
        };
        *slot = Some(sum);
        Ok(())
    }

    /// Overwrites the value in place (every view of this parameter sees it).
    pub fn assign(&self, value: &Tensor) -> Result<()> {
        check_same_shape(self.tensor(), value, "value")?;
        let value = value.to_dtype(self.tensor().dtype())?.to_device(self.tensor().device())?;
        Ok(self.var.set(&value.detach())?)
    }
}

impl Drop for Param {
    fn drop(&mut self) {
        registry().remove(&self.var.as_tensor().id());
    }
}

fn check_same_shape(p: &Tensor, t: &Tensor, what: &str) -> Result<()> {
    if p.dims() != t.dims() {
        return Err(Error::msg(format!(
            "{what} of shape {:?} does not fit a parameter of shape {:?}",
            t.dims(),
            p.dims()
        )));
    }
    Ok(())
}

pub(crate) fn check_scalar(loss: &Tensor) -> Result<()> {
    if loss.elem_count() != 1 {
        return Err(Error::msg(format!(
            "backward needs a scalar loss, got shape {:?} (reduce it with sum() or mean())",
            loss.dims()
        )));
    }
    Ok(())
}

/// A copy of `m` over fresh parameters (its weights' values, detached), and
/// those parameters, in `m`'s weight order: a trainable generator or fake net
/// made from a teacher.
pub fn trainable_copy<M: Component>(m: &M) -> Result<(M, Vec<Arc<Param>>)> {
    let named: Vec<_> = m.named_weights().iter().map(|(n, t)| (n.clone(), t.detach())).collect();
    let (map, params) = params_from(&named)?;
    Ok((m.with_weights(map)?, params))
}

/// Trainable copies of named weights: a parameter per tensor (named as the weight)
/// and a name → live-tensor map to rebuild the model over them.
pub fn params_from(named: &[(String, Tensor)]) -> Result<(HashMap<String, Tensor>, Vec<Arc<Param>>)> {
    let mut map = HashMap::with_capacity(named.len());
    let mut params = Vec::with_capacity(named.len());
    for (name, t) in named {
        let p = Param::new(t, name.as_str())?;
        map.insert(name.clone(), p.tensor().clone());
        params.push(p);
    }
    Ok((map, params))
}

/// Backpropagates a scalar `loss` and adds the gradients to every live parameter it
/// depends on. Returns how many parameters received a gradient.
pub fn backward(loss: &Tensor) -> Result<usize> {
    check_scalar(loss)?;
    // Spans (sidscript::profile) part candle's backward pass from the hand-over.
    let grads = crate::profile::span("backward.graph", loss.device(), || crate::ops::checkpoint::backward(loss))?;
    hand_over(loss, &grads, |_| false)
}

/// Adds each gradient in `grads` to its live parameter's slot, except the
/// parameters `skip` names (their caller sets their slots). Returns how many
/// parameters `grads` reached.
pub(crate) fn hand_over(
    loss: &Tensor,
    grads: &candle_core::backprop::GradStore,
    skip: impl Fn(TensorId) -> bool,
) -> Result<usize> {
    crate::profile::span("backward.hand_over", loss.device(), || {
        // Upgrade under the lock, work after releasing it: dropping an upgraded Arc
        // may run Param::drop, which takes the lock again.
        let reached: Vec<(Arc<Param>, TensorId)> = {
            let reg = registry();
            grads.get_ids().filter_map(|id| reg.get(id).and_then(Weak::upgrade).map(|p| (p, *id))).collect()
        };
        for (p, id) in &reached {
            if let Some(g) = grads.get_id(*id).filter(|_| !skip(*id)) {
                p.accumulate_grad(g)?;
            }
        }
        Ok(reached.len())
    })
}

/// Gradients of a scalar `loss` with respect to `params`, without touching their
/// slots. `None` where the loss does not depend on a parameter.
pub fn grads_of(loss: &Tensor, params: &[Arc<Param>]) -> Result<Vec<Option<Tensor>>> {
    check_scalar(loss)?;
    let grads = crate::ops::checkpoint::backward(loss)?;
    Ok(params.iter().map(|p| grads.get(p.tensor()).map(Tensor::detach)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn backward_accumulates_until_zeroed() -> Result<()> {
        let w = Param::new(&Tensor::new(&[1.0f64, 2.0, 3.0], &Device::Cpu)?, "w")?;
        let loss = || w.tensor().sqr()?.sum_all(); // d/dw = 2w
        assert_eq!(backward(&loss()?)?, 1);
        assert_eq!(w.grad().unwrap().to_vec1::<f64>()?, vec![2.0, 4.0, 6.0]);
        let second = loss()?;
        backward(&second)?;
        assert_eq!(w.grad().unwrap().to_vec1::<f64>()?, vec![4.0, 8.0, 12.0]);
        // The pass freed that graph's activations: a second pass over it is an error
        // that says so, and leaves the slot as it was.
        let err = backward(&second).unwrap_err().to_string();
        assert!(err.contains("compute the loss again"), "{err}");
        assert_eq!(w.grad().unwrap().to_vec1::<f64>()?, vec![4.0, 8.0, 12.0]);
        w.zero_grad();
        assert!(w.grad().is_none());
        let not_scalar = w.tensor().sqr()?;
        assert!(backward(&not_scalar).is_err());
        Ok(())
    }

    #[test]
    fn dropped_params_leave_the_registry() -> Result<()> {
        let id = {
            let p = Param::new(&Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu)?, "tmp")?;
            p.tensor().id()
        };
        assert!(!registry().contains_key(&id));
        Ok(())
    }
}
