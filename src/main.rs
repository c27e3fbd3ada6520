//! The `agentq` binary: parse the command line, set up logging, run.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AGENTQ_LOG")
                .unwrap_or_else(|_| "agentq=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    agentq::cli::run(agentq::cli::Cli::parse()).await
}
