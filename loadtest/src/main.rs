//! `loadtest`: tollgate's load tools.
//!
//! - `loadtest run SCENARIO`: several tenants at once, each with its key and traffic
//!   (open loop at a rate, or closed loop with users), reported per tenant: outcomes,
//!   admitted tokens against the contract the gateway states, latency percentiles.
//! - `loadtest rate`: an open-loop load generator. Requests are scheduled at fixed intended
//!   times (`rate` per second) whether or not earlier ones have finished, and latency is
//!   measured from the intended time, so a stalled server cannot hide its queueing
//!   (no coordinated omission).
//! - `loadtest stub`: a fixed-answer OpenAI-compatible upstream, for measuring what the
//!   gateway adds and for exercising its failure handling (`--fail-status`, slow streams).

use loadtest::{rate, run, stub};

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "loadtest",
    version,
    about = "tollgate's load generator and upstream stub"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Play a multi-tenant scenario and report per tenant.
    Run(run::RunArgs),
    /// Offer a fixed open-loop request rate and report latency percentiles.
    Rate(rate::RateArgs),
    /// Serve a fixed-answer OpenAI-compatible upstream.
    Stub(stub::StubArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = match cli.command {
        Command::Run(a) => rt.block_on(run::run(a)),
        Command::Rate(a) => rt.block_on(rate::run(a)),
        Command::Stub(a) => rt.block_on(stub::run(a)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
