//! The `portcullis` binary: command-line parsing, wiring of the library crates, exit codes.
//!
//! Exit codes (stable, for scripts):
//! - 0: success;
//! - 1: a negative verdict (`pki verify` printed `REJECTED …`);
//! - 2: a usage or input error (bad arguments; an input file that is missing, unreadable or
//!   malformed; a key that does not match its certificate…);
//! - 3: a runtime failure (an output could not be written, signing failed, the admin API could
//!   not be reached or failed).
//!
//! Control-plane commands exit 2 when the admin API refuses the request (4xx: the message says
//! why), and `explain` exits 1 when the request would be denied. A command whose standard output
//! is closed early (`portcullis pki verify … | head -1`) stops quietly with 141, as a shell tool
//! ended by SIGPIPE does.
#![forbid(unsafe_code)]

use portcullis_node::{RuntimeFailure, serve};

mod client;
mod control;
mod pki;

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
    /// Registered CAs: proof of possession, auto-registration, provisioning templates.
    Ca(Control<control::CaCommand>),
    /// Registered certificates: register (one or --bulk), create, list, update, delete, claim.
    Cert(Control<control::CertCommand>),
    /// Things (devices, workloads) and the certificates attached to them.
    Thing(Control<control::ThingCommand>),
    /// Named truststores with numbered versions, and impact previews.
    Truststore(Control<control::TruststoreCommand>),
    /// Server certificates kept in the registry (keys sealed under the cluster key), served by
    /// every node with `certificate = "registry:NAME"`.
    ServerCert(Control<control::ServerCertCommand>),
    /// The cluster key that seals the private keys kept in the registry.
    #[command(subcommand)]
    ClusterKey(ClusterKeyCommand),
    /// The cluster's nodes: version, heartbeat, snapshot freshness, connections and sessions.
    Cluster(Control<control::ClusterCommand>),
    /// Domains and their mappings (the registry's, seeded from the configuration file).
    Domain(Control<control::DomainCommand>),
    /// Policies: documents with certificate variables, versions, attachments, simulation.
    Policy(Control<control::PolicyCommand>),
    /// Fleet provisioning templates: how a device with a claim certificate becomes a thing
    /// with its own certificate (IoT Core's MQTT API).
    ProvisioningTemplate(Control<control::ProvisioningTemplateCommand>),
    /// Webhooks: signed JSON events about certificates, CAs and truststores, with retries.
    Webhook(Control<control::WebhookCommand>),
    /// MQTT sessions: list, disconnect.
    Sessions(Control<control::SessionsCommand>),
    /// The audit log.
    Audit(Control<control::AuditCommand>),
    /// Admin API access: bearer tokens.
    Admin(Control<control::AdminCommand>),
    /// Why a certificate is allowed or refused on a domain: the gateway's full decision trace.
    Explain(ControlArgs<control::ExplainArgs>),
    /// Enroll a device: a client certificate from the local CA (registered ACTIVE), written as
    /// .p12 (modern and legacy) and an Apple .mobileconfig for the device or its MDM.
    Enroll(ControlArgs<control::EnrollArgs>),
    /// Shell completions on standard output (`portcullis completions bash >
    /// /etc/bash_completion.d/portcullis`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Manual pages: portcullis.1 and one per subcommand (portcullis-pki-issue.1…), written to
    /// a directory (`man -l DIR/portcullis.1`; packages install them under
    /// /usr/share/man/man1).
    Man {
        /// The directory (created if missing).
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
    },
}

/// Completions and manual pages, generated from the command-line definition itself.
fn generated(command: &Command) -> anyhow::Result<ExitCode> {
    use clap::CommandFactory;
    let mut cli = Cli::command();
    match command {
        Command::Completions { shell } => {
            // Into memory first: clap_complete panics on a write error (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut cli, "portcullis", &mut script);
            portcullis_node::out!("{}", String::from_utf8_lossy(&script));
        }
        Command::Man { out } => {
            std::fs::create_dir_all(out)
                .and_then(|()| clap_mangen::generate_to(cli, out))
                .map_err(|e| {
                    RuntimeFailure(format!("writing manual pages to {}: {e}", out.display()))
                })?;
            portcullis_node::outln!(
                "wrote portcullis.1 and a page per subcommand to {}",
                out.display()
            );
        }
        _ => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// `portcullis cluster-key …`
#[derive(Debug, Subcommand)]
enum ClusterKeyCommand {
    /// Make a new random cluster key file (mode 0600). Give every node of a cluster the same
    /// file (`cluster_key_file`); keep a copy offline: without it the keys in the registry
    /// cannot be opened.
    Generate {
        /// Where to write it.
        #[arg(long, value_name = "FILE")]
        out: std::path::PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
}

fn cluster_key(command: ClusterKeyCommand) -> anyhow::Result<ExitCode> {
    match command {
        ClusterKeyCommand::Generate { out, force } => {
            let text = portcullis_registry::sealed::ClusterKey::generate()?;
            let mut outputs = portcullis_node::output::Outputs::default();
            outputs.secret(&out, text);
            outputs.write(force)?;
            portcullis_node::outln!(
                "wrote cluster key {} (0600): set cluster_key_file = \"{}\" on every node",
                out.display(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A control-plane command group and how to reach the admin API.
#[derive(Debug, clap::Args)]
struct Control<C: Subcommand> {
    #[command(subcommand)]
    command: C,
    #[command(flatten)]
    connect: client::Connect,
}

/// A control-plane command with arguments and how to reach the admin API.
#[derive(Debug, clap::Args)]
struct ControlArgs<A: clap::Args> {
    #[command(flatten)]
    args: A,
    #[command(flatten)]
    connect: client::Connect,
}

fn main() -> ExitCode {
    // Every binary installs aws-lc-rs as the process-wide rustls provider before any TLS use.
    // Failure only means one is installed already, which is the same provider.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Pki(cmd) => pki::run(cmd),
        Command::Serve(args) => serve::run(args),
        Command::Ca(c) => control::run(control::Control::Ca(c.command), c.connect),
        Command::Cert(c) => control::run(control::Control::Cert(c.command), c.connect),
        Command::Thing(c) => control::run(control::Control::Thing(c.command), c.connect),
        Command::Truststore(c) => control::run(control::Control::Truststore(c.command), c.connect),
        Command::ServerCert(c) => control::run(control::Control::ServerCert(c.command), c.connect),
        Command::ClusterKey(c) => cluster_key(c),
        Command::Cluster(c) => control::run(control::Control::Cluster(c.command), c.connect),
        Command::Domain(c) => control::run(control::Control::Domain(c.command), c.connect),
        Command::Policy(c) => control::run(control::Control::Policy(c.command), c.connect),
        Command::ProvisioningTemplate(c) => {
            control::run(control::Control::ProvisioningTemplate(c.command), c.connect)
        }
        Command::Webhook(c) => control::run(control::Control::Webhook(c.command), c.connect),
        Command::Sessions(c) => control::run(control::Control::Sessions(c.command), c.connect),
        Command::Audit(c) => control::run(control::Control::Audit(c.command), c.connect),
        Command::Admin(c) => control::run(control::Control::Admin(c.command), c.connect),
        Command::Explain(c) => control::run(control::Control::Explain(c.args), c.connect),
        Command::Enroll(c) => control::run(control::Control::Enroll(c.args), c.connect),
        c @ (Command::Completions { .. } | Command::Man { .. }) => generated(&c),
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
