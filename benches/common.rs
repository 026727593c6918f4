//! Shared by the benches (included with #[path]).
use std::time::Instant;

/// The best of `reps` timed runs of `f`, in seconds, after one warm-up run.
pub fn best<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// The bench named on the command line (`cargo bench --bench NAME -- toy`), if any.
pub fn named() -> Option<String> {
    std::env::args().skip(1).find(|a| !a.starts_with('-'))
}

/// Whether the bench called `name` runs: all do when none is named.
pub fn wanted(name: &str) -> bool {
    named().is_none_or(|o| name.contains(&o))
}

/// Runs `benches` as the CLI runs its commands: the process tuned, on candle's
/// compute pool.
pub fn run_benches(benches: impl FnOnce() + Send) {
    sidscript::cli::tune_runtime();
    sidscript::on_compute_pool(benches);
}

/// SIDSCRIPT_BENCH_DEVICE (cpu or cuda:N), the CPU when unset.
pub fn bench_device() -> candle_core::Device {
    let name = std::env::var("SIDSCRIPT_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    sidscript::host::args::parse_device(&name).unwrap_or_else(|e| panic!("SIDSCRIPT_BENCH_DEVICE: {e}"))
}
