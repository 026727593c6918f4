use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = sidscript::cli::Cli::parse();
    sidscript::cli::tune_runtime();
    match sidscript::on_compute_pool(|| sidscript::cli::main(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
