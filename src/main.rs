//! The `agentq` binary: parse the command line and run it.

use std::process::ExitCode;

use agentq::executor::lease_guard;
use clap::Parser;

fn main() -> ExitCode {
    // The lease guard, started by `agentq worker` beside itself, is a plain
    // loop on its stdin: no runtime, no command line to parse.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == lease_guard::SUBCOMMAND)
    {
        return match lease_guard::run_guard() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("agentq lease guard: {e}");
                ExitCode::from(1)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(agentq::cli::run(agentq::cli::Cli::parse()))
}
