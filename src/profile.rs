//! Where a step's time goes on a device that works asynchronously: named spans
//! that synchronise the device before and after the work they wrap, so that a
//! span's wall time is the device time of its work. Spans nest, and each one's
//! time includes its children's (`unet.resnet` includes the `conv.*` and
//! `norm.*` inside it; a `step.*.backward` includes every `*.backward` span the
//! gradient pass ran).
//!
//! Off by default, and then a span is the plain call: the synchronisations would
//! cost a GPU its overlap of host and device work. The `sid_iteration` bench turns
//! it on for one extra iteration after its timings (`SIDSCRIPT_BENCH_PROFILE=1`);
//! a program can with [`set_enabled`] or `SIDSCRIPT_PROFILE=1`.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! sidscript::profile::set_enabled(true);
//! let x = Tensor::ones(4, candle_core::DType::F32, &Device::Cpu).unwrap();
//! let y = sidscript::profile::span("example.double", &Device::Cpu, || (&x * 2.0).unwrap());
//! assert_eq!(y.to_vec1::<f32>().unwrap(), [2.0; 4]);
//! assert_eq!(sidscript::profile::report()[0].name, "example.double");
//! sidscript::profile::set_enabled(false);
//! ```

use candle_core::Device;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// 0: not yet read from the environment; 1: off; 2: on.
static STATE: AtomicU8 = AtomicU8::new(0);
static TOTALS: Mutex<Option<HashMap<&'static str, (u64, f64)>>> = Mutex::new(None);

/// Whether spans are timed: [`set_enabled`]'s last value, else `SIDSCRIPT_PROFILE=1`.
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("SIDSCRIPT_PROFILE").is_ok_and(|v| v == "1" || v == "true");
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        s => s == 2,
    }
}

/// Turns timing on or off (what has been gathered stays until [`reset`]).
pub fn set_enabled(on: bool) {
    STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// Forgets the gathered totals.
pub fn reset() {
    *TOTALS.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// Runs `f`; when profiling, with `dev` synchronised before and after, adding the
/// wall time between to `name`'s total.
pub fn span<R>(name: &'static str, dev: &Device, f: impl FnOnce() -> R) -> R {
    if !enabled() {
        return f();
    }
    // A failed synchronisation only blurs the figure; the work's own errors surface
    // through its result.
    let _ = dev.synchronize();
    let start = Instant::now();
    let r = f();
    let _ = dev.synchronize();
    let secs = start.elapsed().as_secs_f64();
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let e = totals.get_or_insert_with(HashMap::new).entry(name).or_insert((0, 0.0));
    e.0 += 1;
    e.1 += secs;
    r
}

/// One span's totals.
#[derive(Clone, Debug, PartialEq)]
pub struct SpanTotal {
    /// The span's name.
    pub name: &'static str,
    /// How many times it ran.
    pub calls: u64,
    /// Its time, children included, in seconds.
    pub seconds: f64,
}

/// The gathered totals, longest first.
pub fn report() -> Vec<SpanTotal> {
    let totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let mut rows: Vec<SpanTotal> =
        totals.iter().flatten().map(|(name, &(calls, seconds))| SpanTotal { name, calls, seconds }).collect();
    rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds).then(a.name.cmp(b.name)));
    rows
}

/// [`report`] as a table, each span's share taken of `whole` seconds.
pub fn table(whole: f64) -> String {
    let mut s = format!("  {:<28} {:>7} {:>10} {:>7}\n", "span (children included)", "calls", "ms", "share");
    for r in report() {
        s += &format!(
            "  {:<28} {:>7} {:>10.1} {:>6.1}%\n",
            r.name,
            r.calls,
            r.seconds * 1e3,
            100.0 * r.seconds / whole.max(1e-12)
        );
    }
    s
}
