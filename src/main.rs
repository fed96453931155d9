//! The `previewd` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    previewd::cli::run(previewd::cli::Cli::parse())
}
