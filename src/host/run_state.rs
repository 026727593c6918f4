//! What native functions share during one run: the seeded generator, the default
//! device and dtype, and the run's configuration map.

use crate::rng::Generator;
use candle_core::{DType, Device};
use rhai::Map;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// What a run's native functions share: its seeded generator, device, dtype and configuration.
pub struct RunState {
    rng: Mutex<Generator>,
    seed: std::sync::atomic::AtomicU64,
    /// Where new tensors and loaded models go.
    pub device: Device,
    /// The dtype models load in.
    pub dtype: DType,
    config: Mutex<Map>,
    /// Raised to stop the running script at its next operation (Ctrl-C); native
    /// functions that wait (`sleep`) watch it too. Lowered by whoever acts on it.
    pub cancel: Arc<AtomicBool>,
}

impl RunState {
    /// A run seeded with `seed` on `device`, f32, with an empty configuration.
    pub fn new(seed: u64, device: Device) -> Self {
        Self {
            rng: Mutex::new(Generator::new(seed)),
            seed: seed.into(),
            device,
            dtype: DType::F32,
            config: Mutex::new(Map::new()),
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The run's generator. A panic elsewhere cannot leave it half-updated, so a
    /// poisoned lock is simply taken over.
    pub fn rng(&self) -> MutexGuard<'_, Generator> {
        self.rng.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Restarts the generator from `seed`.
    pub fn reseed(&self, seed: u64) {
        *self.rng() = Generator::new(seed);
        self.seed.store(seed, std::sync::atomic::Ordering::Relaxed);
    }

    /// The seed the run's generator was last seeded with (`--seed` or `seed(n)`).
    pub fn seed(&self) -> u64 {
        self.seed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The configuration (`cfg`).
    pub fn config(&self) -> Map {
        self.config.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the configuration.
    pub fn set_config(&self, cfg: Map) {
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = cfg;
    }

    /// Takes a raised cancel flag (lowering it): true when the script must stop.
    pub fn take_cancel(&self) -> bool {
        self.cancel.swap(false, Ordering::Relaxed)
    }
}
