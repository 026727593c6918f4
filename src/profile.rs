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

use crate::env_switch::EnvSwitch;
use candle_core::Device;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: EnvSwitch = EnvSwitch::new("SIDSCRIPT_PROFILE", false);
static TOTALS: Mutex<Option<HashMap<&'static str, (u64, f64)>>> = Mutex::new(None);

/// Whether spans are timed: [`set_enabled`]'s last value, else `SIDSCRIPT_PROFILE=1`.
pub fn enabled() -> bool {
    ENABLED.on()
}

/// Turns timing on or off (what has been gathered stays until [`reset`]).
pub fn set_enabled(on: bool) {
    ENABLED.set(on);
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
    add(name, start.elapsed().as_secs_f64());
    r
}

/// Adds one call of `secs` seconds to `name`'s total.
fn add(name: &'static str, secs: f64) {
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let e = totals.get_or_insert_with(HashMap::new).entry(name).or_insert((0, 0.0));
    e.0 += 1;
    e.1 += secs;
}

/// A backward pass timed node by node, each node's step (its op's backward and the
/// accumulation of what it passes on) totalled under `bwd:<op kind>` — where
/// candle's own backward ops spend their time, which the spans around sidscript's
/// kernels cannot show. Nodes run inside the pass, so the census is fed from its
/// events: [`BackwardCensus::start`] before it, [`BackwardCensus::lap`] after each
/// step. `ops::checkpoint::backward_with`, which every backward in sidscript goes
/// through, keeps one.
///
/// ```
/// use candle_core::{Device, Var};
/// let x = Var::new(&[1.0f32, 2.0, 3.0], &Device::Cpu)?;
/// sidscript::profile::set_enabled(true);
/// let loss = x.as_tensor().sqr()?.sum_all()?;
/// sidscript::ops::checkpoint::backward(&loss)?;
/// sidscript::profile::set_enabled(false);
/// let rows: Vec<_> = sidscript::profile::report().iter().map(|r| (r.name, r.calls)).collect();
/// assert!(rows.contains(&("bwd:sqr", 1)) && rows.contains(&("bwd:sum", 1)), "{rows:?}");
/// # Ok::<(), sidscript::Error>(())
/// ```
pub struct BackwardCensus {
    dev: Device,
    last: Instant,
}

impl BackwardCensus {
    /// A census of the pass about to run on `dev`, or `None` when not profiling.
    pub fn start(dev: &Device) -> Option<Self> {
        if !enabled() {
            return None;
        }
        let _ = dev.synchronize();
        Some(Self { dev: dev.clone(), last: Instant::now() })
    }

    /// Ends a lap: the device work and host time since the previous lap go to
    /// `bwd:<kind>`.
    pub fn lap(&mut self, kind: &str) {
        let _ = self.dev.synchronize();
        let now = Instant::now();
        add(census_name(kind), (now - self.last).as_secs_f64());
        self.last = now;
    }
}

/// `bwd:<kind>` as a span name; each distinct kind is allocated once (there are a
/// few dozen op kinds).
fn census_name(kind: &str) -> &'static str {
    static NAMES: Mutex<Option<HashMap<String, &'static str>>> = Mutex::new(None);
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    names
        .get_or_insert_with(HashMap::new)
        .entry(kind.to_string())
        .or_insert_with(|| Box::leak(format!("bwd:{kind}").into_boxed_str()))
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
    let rows = report();
    let w = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(28);
    let mut s = format!("  {:<w$} {:>7} {:>10} {:>7}\n", "span (children included)", "calls", "ms", "share");
    for r in rows {
        s += &format!(
            "  {:<w$} {:>7} {:>10.1} {:>6.1}%\n",
            r.name,
            r.calls,
            r.seconds * 1e3,
            100.0 * r.seconds / whole.max(1e-12)
        );
    }
    s
}
