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
