//! The `agentq` binary: parse the command line and run it.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    agentq::cli::run(agentq::cli::Cli::parse()).await
}
