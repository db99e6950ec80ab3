//! The `swarmfs` binary: parses arguments, runs the command, maps errors to exit codes.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = swarmfs::cli::Cli::parse();
    swarmfs::cli::init_logging(&args);
    match swarmfs::cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("swarmfs: {e:#}");
            ExitCode::from(swarmfs::api::ApiError::from(e).exit_code())
        }
    }
}
