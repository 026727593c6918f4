//! Ctrl-C. The first press asks the running job to stop at a safe point (a training
//! loop finishes its iteration and writes a checkpoint; the REPL cancels the running
//! statement); a second press during a run stops the process at once.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

static PRESSES: AtomicUsize = AtomicUsize::new(0);
type Target = Option<(Arc<AtomicBool>, bool, &'static str)>;
static TARGET: OnceLock<std::sync::Mutex<Target>> = OnceLock::new();

fn target() -> &'static std::sync::Mutex<Target> {
    TARGET.get_or_init(|| std::sync::Mutex::new(None))
}

/// Routes Ctrl-C to `flag`, printing `message` (if not empty) at the first press.
/// With `second_exits`, a second press before the flag is handled (reset with
/// [`reset`]) exits with status 130.
pub fn route_to(flag: Arc<AtomicBool>, second_exits: bool, message: &'static str) {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    *target().lock().unwrap_or_else(|e| e.into_inner()) = Some((flag, second_exits, message));
    INSTALLED.get_or_init(|| {
        let installed = ctrlc::set_handler(|| {
            let n = PRESSES.fetch_add(1, Ordering::SeqCst);
            if let Some((flag, second_exits, message)) = &*target().lock().unwrap_or_else(|e| e.into_inner()) {
                if n >= 1 && *second_exits {
                    eprintln!("\nstopped");
                    std::process::exit(130);
                }
                if !message.is_empty() {
                    eprintln!("\n{message}");
                }
                flag.store(true, Ordering::SeqCst);
            }
        });
        // Without a handler Ctrl-C ends the process at once: no checkpoint, no kept session.
        if let Err(e) = installed {
            eprintln!("warning: Ctrl-C handling is off ({e}); Ctrl-C will end the process at once");
        }
    });
}

static USR1: AtomicBool = AtomicBool::new(false);

#[cfg(unix)]
extern "C" fn on_usr1(_: nix::libc::c_int) {
    USR1.store(true, Ordering::SeqCst);
}

/// From now on SIGUSR1 asks a training run to stop after its iteration and checkpoint,
/// as the first Ctrl-C does. Open MPI's mpirun forwards SIGUSR1 to every rank (on
/// SIGINT or SIGTERM it kills the job), and Slurm sends it ahead of a time limit with
/// `--signal=USR1@SECONDS`.
pub fn listen_for_usr1() {
    #[cfg(unix)]
    {
        use nix::sys::signal::{signal, SigHandler, Signal};
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        if let Err(e) = unsafe { signal(Signal::SIGUSR1, SigHandler::Handler(on_usr1)) } {
            eprintln!("warning: SIGUSR1 handling is off ({e})");
        }
    }
}

/// Whether SIGUSR1 arrived since `listen_for_usr1`.
pub fn usr1_received() -> bool {
    USR1.load(Ordering::SeqCst)
}

/// Forgets earlier presses (after the flag was handled).
pub fn reset() {
    PRESSES.store(0, Ordering::SeqCst);
}
