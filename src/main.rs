use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = sidscript::cli::Cli::parse();
    match sidscript::on_compute_pool(|| sidscript::cli::main(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
