use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = sidscript::cli::Cli::parse();
    // One rank of an MPI job when a launcher started us (the `mpi` feature); held to the end.
    let _dist = match sidscript::dist::init() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    sidscript::cli::tune_runtime();
    match sidscript::on_compute_pool(|| sidscript::cli::main(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let w = sidscript::dist::world();
            if w.size > 1 {
                // The others may be waiting for this rank in a collective: end them all.
                eprintln!("error on rank {} of {}: {e}", w.rank, w.size);
                sidscript::dist::abort(1);
            }
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
