//! The `portcullis` binary: command-line parsing, wiring of the library crates, exit codes.
//!
//! Exit codes (stable, for scripts):
//! - 0: success;
//! - 1: a negative verdict (`pki verify` printed `REJECTED …`);
//! - 2: a usage or input error (bad arguments; an input file that is missing, unreadable or
//!   malformed; a key that does not match its certificate…);
//! - 3: a runtime failure (an output could not be written, signing failed).
#![forbid(unsafe_code)]

mod output;
mod pki;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Portcullis: a self-hosted mutual-TLS gateway and certificate registry.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Certificate toolkit: CAs, leaves, CSRs, inspection, verification, truststores, PKCS#12, CRLs.
    #[command(subcommand)]
    Pki(pki::PkiCommand),
    /// Run the mutual-TLS gateway (with no configuration: a working quickstart on localhost:8443).
    Serve(serve::ServeArgs),
}

/// A runtime failure (exit 3) rather than bad input (exit 2): an output that cannot be written.
#[derive(Debug)]
pub struct RuntimeFailure(pub String);

impl std::fmt::Display for RuntimeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RuntimeFailure {}

fn main() -> ExitCode {
    // Every binary installs aws-lc-rs as the process-wide rustls provider before any TLS use.
    // Failure only means one is installed already, which is the same provider.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Pki(cmd) => pki::run(cmd),
        Command::Serve(args) => serve::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // One line: every context, outermost first.
            eprintln!("error: {err:#}");
            let runtime = err.chain().any(|c| {
                c.is::<RuntimeFailure>()
                    || matches!(
                        c.downcast_ref::<portcullis_pki::PkiError>(),
                        Some(portcullis_pki::PkiError::Signing(_))
                    )
            });
            ExitCode::from(if runtime { 3 } else { 2 })
        }
    }
}
