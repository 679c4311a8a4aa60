//! `portcullis serve` as a library: one gateway node.
//!
//! - [`config`]: the TOML configuration file (serde, unknown keys refused with their line), the
//!   registry's domains and truststores read beforehand ([`config::RegistryConfig`]), and the
//!   builder of a `portcullis_gateway::Config` from both; the admin API's domain writes go
//!   through the same builder first.
//! - [`data_dir`]: the local CA, `auto` server certificates and the quickstart.
//! - [`admin`]: the admin listener's credentials and the hooks the admin API calls on this node.
//! - [`serve`]: the node's life: open the registry, seed it, start the gateway and the admin API,
//!   follow the registry (snapshots and reloads), run the workers (just-in-time registrations,
//!   sightings, webhooks, registry events to MQTT), signals, drain.
//! - [`output`]: files written all at once, keys 0600, never over an existing file unasked.
//! - `fleet`: fleet provisioning by claim (IoT Core's MQTT API), answered from the registry
//!   and the local CA; `bus`: MQTT across nodes on NATS; `cluster`: what a cluster shares.
//!
//! Invariants: a failed reload keeps the running state; the gateway is never handed a snapshot
//! older than the one it has; nothing here runs on the handshake path.
#![forbid(unsafe_code)]

/// `println!` that ends the process quietly when standard output is closed (see [`stdout`]).
#[macro_export]
macro_rules! outln {
    () => { $crate::stdout(format_args!("\n")) };
    ($($t:tt)*) => { $crate::stdout(format_args!("{}\n", format_args!($($t)*))) };
}

/// `print!` that ends the process quietly when standard output is closed (see [`stdout`]).
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => { $crate::stdout(format_args!($($t)*)) };
}

mod acme;
pub mod admin;
mod bus;
mod cluster;
pub mod config;
pub mod data_dir;
mod fleet;
mod foreign;
mod history;
pub mod output;
mod revocation;
mod scep;
pub mod serve;
mod sync;
mod token;
mod workers;

/// Writes to standard output. A reader that went away (`| head -1`) ends the command at once,
/// quietly, with exit code 141 (128 + SIGPIPE, what a shell tool ended by the signal reports);
/// any other write error is a runtime failure reported on standard error.
pub fn stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("error: cannot write to standard output: {e}");
        std::process::exit(3);
    }
}

/// A runtime failure (exit 3) rather than bad input (exit 2): an output that cannot be written,
/// an admin API that cannot be reached.
#[derive(Debug)]
pub struct RuntimeFailure(pub String);

impl std::fmt::Display for RuntimeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RuntimeFailure {}
