//! Control-plane commands (`portcullis ca|cert|thing|truststore|domain|audit|admin|explain …`): thin
//! shells over the admin API. Listings print text, or the API's JSON with `--json`.

use portcullis_node::outln;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::client::{AdminClient, Connect, segment};
use portcullis_node::output::{Outputs, read};

/// `portcullis ca …`
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the registration code: the CN of verification certificates.
    RegistrationCode,
    /// Register a CA with proof of possession.
    Register(CaRegisterArgs),
    /// List registered CAs.
    List,
    /// Show one registered CA.
    Describe {
        /// CA id (SHA-256 of its DER).
        id: String,
    },
    /// Change a CA: status, auto-registration, provisioning template; revoke what it issued.
    Update(CaUpdateArgs),
}

#[derive(Debug, Args)]
pub struct CaRegisterArgs {
    /// The CA certificate (PEM or DER).
    #[arg(long, value_name = "FILE")]
    cert: PathBuf,
    /// The verification certificate: CN = registration code, signed by the CA's key.
    #[arg(long, value_name = "FILE", required_unless_present = "no_verification")]
    verification_cert: Option<PathBuf>,
    /// Register without proof of possession (flagged unverified).
    #[arg(long, conflicts_with = "verification_cert")]
    no_verification: bool,
    /// ACTIVE at once (default INACTIVE).
    #[arg(long)]
    activate: bool,
    /// Register certificates it issued just in time, at their first connection.
    #[arg(long)]
    auto_register: bool,
    /// Provisioning template (JSON) for just-in-time provisioning.
    #[arg(long, value_name = "FILE")]
    template: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CaUpdateArgs {
    /// CA id.
    id: String,
    /// ACTIVE or INACTIVE.
    #[arg(long)]
    status: Option<String>,
    /// Auto-registration on or off.
    #[arg(long, value_name = "on|off")]
    auto_register: Option<String>,
    /// New provisioning template (JSON).
    #[arg(long, value_name = "FILE", conflicts_with = "no_template")]
    template: Option<PathBuf>,
    /// Remove the provisioning template.
    #[arg(long)]
    no_template: bool,
    /// Also revoke every certificate the CA issued.
    #[arg(long)]
    revoke_issued: bool,
    /// Make it a claim CA: every certificate it issues may only provision devices under these
    /// fleet provisioning templates (comma-separated), registered or not.
    #[arg(long, value_delimiter = ',', conflicts_with = "no_claim")]
    claim_templates: Vec<String>,
    /// Make it an ordinary CA again.
    #[arg(long)]
    no_claim: bool,
}

/// `portcullis cert …`
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Register a certificate (or every .pem/.crt in a directory with --bulk).
    Register(CertRegisterArgs),
    /// Make a certificate with the local CA: from a CSR, or with a new key (written 0600).
    Create(CertCreateArgs),
    /// List certificates.
    List(CertListArgs),
    /// Show one certificate.
    Describe {
        /// Certificate id (SHA-256 of its DER).
        id: String,
    },
    /// Change a certificate's status (REVOKED is permanent).
    Update {
        /// Certificate id.
        id: String,
        /// ACTIVE, INACTIVE, REVOKED or PENDING_ACTIVATION.
        #[arg(long)]
        status: String,
        /// With REVOKED: why (keyCompromise, superseded, cessationOfOperation,
        /// affiliationChanged, privilegeWithdrawn, cACompromise, aACompromise, unspecified), as
        /// the local CA's CRL and OCSP answers publish it.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Delete a certificate that is not ACTIVE.
    Delete {
        /// Certificate id.
        id: String,
    },
    /// Renew a certificate with the local CA: a new key (written 0600) or the device's CSR for
    /// the same subject; the new certificate goes where the old one is (things, policies), and
    /// the old one becomes INACTIVE once the new one is first seen on a connection.
    Renew {
        /// Certificate id.
        id: String,
        /// Sign this CSR (the device keeps its key; same subject and SANs).
        #[arg(long, value_name = "FILE", conflicts_with = "key_type")]
        csr: Option<PathBuf>,
        /// The new key's type (default EC P-256).
        #[arg(long)]
        key_type: Option<String>,
        /// Lifetime in days.
        #[arg(long)]
        days: Option<u32>,
        /// Where to write cert.pem, chain.pem (and key.pem).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// How renewal stands: certificates due (past two thirds of their lifetime, not renewed),
    /// overdue (expired while ACTIVE), and renewals issued.
    Renewal,
    /// Make a certificate a claim certificate: it may then only provision devices (IoT Core's
    /// fleet provisioning MQTT API) under the templates named, nothing else.
    Claim {
        /// Certificate id.
        id: String,
        /// Provisioning templates it may register devices under (comma-separated).
        #[arg(long, value_delimiter = ',', required_unless_present = "clear")]
        templates: Vec<String>,
        /// Make it an ordinary certificate again.
        #[arg(long, conflicts_with = "templates")]
        clear: bool,
    },
}

/// `portcullis provisioning-template …`
#[derive(Debug, Subcommand)]
pub enum ProvisioningTemplateCommand {
    /// Create a fleet provisioning template from a JSON document (docs/lifecycle.md).
    Create {
        /// Name: the templateName devices use in RegisterThing.
        name: String,
        /// The document (JSON): thing_name, attributes, parameters, policies,
        /// certificate_status, device_configuration.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// What it is for.
        #[arg(long, default_value = "")]
        description: String,
        /// Create it disabled (devices cannot use it yet).
        #[arg(long)]
        disabled: bool,
    },
    /// List templates.
    List,
    /// Show one template.
    Describe {
        /// Name.
        name: String,
    },
    /// Change a template: its document, description, or whether devices may use it.
    Update {
        /// Name.
        name: String,
        /// A new document (JSON).
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// A new description.
        #[arg(long)]
        description: Option<String>,
        /// Let devices use it.
        #[arg(long, conflicts_with = "disable")]
        enable: bool,
        /// Stop devices from using it.
        #[arg(long)]
        disable: bool,
    },
    /// Delete a template.
    Delete {
        /// Name.
        name: String,
    },
    /// One-time enrollment codes for the template: a device with no certificate yet enrolls
    /// over EST (`simpleenroll`, HTTP Basic authentication, the code as the password). Printed
    /// once; only their hashes are kept.
    Codes {
        /// Name.
        name: String,
        /// How many.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// How long they are good, in hours.
        #[arg(long, default_value_t = 168)]
        ttl_hours: i64,
    },
    /// An Apple .mobileconfig that enrolls one device by SCEP under the template: its SCEP
    /// payload makes the device generate its own key and carries a one-time challenge.
    Mobileconfig {
        /// Name.
        name: String,
        /// The device's common name.
        #[arg(long)]
        cn: String,
        /// Where devices reach the builtin:scep mapping, such as https://gateway.example.com/scep.
        #[arg(long)]
        url: String,
        /// The file to write (0600: it holds the challenge).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// How long the challenge is good, in hours.
        #[arg(long, default_value_t = 168)]
        ttl_hours: i64,
        /// The RSA key size the device makes.
        #[arg(long, default_value_t = 2048)]
        key_size: u32,
        /// Overwrite FILE.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
pub struct CertRegisterArgs {
    /// The certificate (PEM or DER).
    #[arg(long, value_name = "FILE", required_unless_present = "bulk")]
    cert: Option<PathBuf>,
    /// Register every .pem, .crt and .cer file in this directory.
    #[arg(long, value_name = "DIR", conflicts_with = "cert")]
    bulk: Option<PathBuf>,
    /// ACTIVE, INACTIVE (default) or PENDING_ACTIVATION.
    #[arg(long, default_value = "INACTIVE")]
    status: String,
    /// Batches in flight during --bulk.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Certificates per request (one transaction each) during --bulk, at most 1000.
    #[arg(long, default_value_t = 250)]
    batch: usize,
    /// Put it under this provisioning template's renewal terms (its due point and grace
    /// period), as if the template had provisioned it.
    #[arg(long, value_name = "TEMPLATE", conflicts_with = "bulk")]
    renewal_template: Option<String>,
}

#[derive(Debug, Args)]
pub struct CertCreateArgs {
    /// Sign this CSR.
    #[arg(long, value_name = "FILE", required_unless_present = "common_name")]
    csr: Option<PathBuf>,
    /// Or make a new key and a certificate with this CN.
    #[arg(long, conflicts_with = "csr")]
    common_name: Option<String>,
    /// Key type with --common-name.
    #[arg(long)]
    key_type: Option<String>,
    /// Lifetime in days.
    #[arg(long)]
    days: Option<u32>,
    /// ACTIVE, INACTIVE (default) or PENDING_ACTIVATION.
    #[arg(long, default_value = "INACTIVE")]
    status: String,
    /// Where to write cert.pem (and key.pem, chain.pem).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
    /// Issue a subject whose CN, O, OU or C holds / + # * ? $ (refused by default: policies
    /// never substitute such a value).
    #[arg(long)]
    allow_separators: bool,
}

#[derive(Debug, Args)]
pub struct CertListArgs {
    /// Only this status.
    #[arg(long)]
    status: Option<String>,
    /// Only certificates issued by this registered CA (id).
    #[arg(long)]
    ca: Option<String>,
    /// Only certificates attached to this thing.
    #[arg(long)]
    thing: Option<String>,
    /// Only certificates expiring within this many days.
    #[arg(long, value_name = "DAYS")]
    expiring_within: Option<u32>,
    /// Page size.
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// Start after this id (the previous page's `next`).
    #[arg(long)]
    after: Option<String>,
    /// Follow every page.
    #[arg(long)]
    all: bool,
}

/// `portcullis thing …`
#[derive(Debug, Subcommand)]
pub enum ThingCommand {
    /// Create a thing.
    Create {
        /// Name: 1-128 of A-Z a-z 0-9 : _ - .
        name: String,
        /// Attributes, KEY=VALUE (repeatable).
        #[arg(long = "attr", value_name = "KEY=VALUE")]
        attributes: Vec<String>,
    },
    /// List things.
    List {
        /// Start after this name.
        #[arg(long)]
        after: Option<String>,
        /// Page size.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Show a thing and its certificates.
    Describe {
        /// Name.
        name: String,
    },
    /// Set or remove attributes.
    Update {
        /// Name.
        name: String,
        /// KEY=VALUE to set (repeatable).
        #[arg(long = "attr", value_name = "KEY=VALUE")]
        attributes: Vec<String>,
        /// KEY to remove (repeatable).
        #[arg(long = "remove", value_name = "KEY")]
        remove: Vec<String>,
    },
    /// Delete a thing (detach its certificates first).
    Delete {
        /// Name.
        name: String,
    },
    /// Attach a certificate.
    Attach {
        /// Thing name.
        name: String,
        /// Certificate id.
        certificate: String,
        /// The certificate may belong to this thing only.
        #[arg(long)]
        exclusive: bool,
    },
    /// Detach a certificate.
    Detach {
        /// Thing name.
        name: String,
        /// Certificate id.
        certificate: String,
    },
}

/// `portcullis truststore …`
#[derive(Debug, Subcommand)]
pub enum TruststoreCommand {
    /// Create a truststore (version 1) from a PEM bundle and CRLs.
    Create(TruststoreArgs),
    /// Add a version (immutable, numbered); domains that follow the latest pick it up.
    AddVersion(TruststoreArgs),
    /// List truststores.
    List,
    /// Show the latest version, or one version.
    #[command(disable_version_flag = true)]
    Describe {
        /// Name.
        name: String,
        /// Version number.
        #[arg(long)]
        version: Option<i64>,
    },
    /// Impact preview: certificates seen recently, on the domains that use this truststore,
    /// that a stored version (--version) or a bundle not stored yet (--bundle) would reject.
    #[command(disable_version_flag = true)]
    Preview {
        /// Name.
        name: String,
        /// Version number.
        #[arg(long, required_unless_present = "bundle", conflicts_with = "bundle")]
        version: Option<i64>,
        /// A bundle to preview before storing it (PEM, DER or PKCS#7).
        #[arg(long, value_name = "FILE")]
        bundle: Option<PathBuf>,
        /// CRL (PEM or DER) to preview with --bundle, repeatable.
        #[arg(long = "crl", value_name = "FILE", requires = "bundle")]
        crls: Vec<PathBuf>,
        /// How far back to look.
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
    /// Delete a truststore (every version) that no domain uses.
    Delete {
        /// Name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct TruststoreArgs {
    /// Name: 1-128 of A-Z a-z 0-9 : _ - . (`cas` is reserved: registry:cas is every
    /// registered ACTIVE CA).
    name: String,
    /// Bundle of CA certificates: PEM, DER (one or several concatenated) or PKCS#7 (.p7b).
    #[arg(long, value_name = "FILE")]
    bundle: PathBuf,
    /// CRL (PEM or DER), repeatable.
    #[arg(long = "crl", value_name = "FILE")]
    crls: Vec<PathBuf>,
}

/// `portcullis cluster …`
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// The nodes that sent a heartbeat in the last day, and how current each one is.
    Status,
    /// Issues a NATS server's certificate from the cluster's CA (server and client, for its
    /// routes too): writes NAME.pem, NAME.key (0600) and ca.pem for the server's `tls` blocks,
    /// so nodes and NATS servers verify each other with the cluster's own CA.
    NatsCert {
        /// The NATS server's name.
        name: String,
        /// A host name or IP address the nodes and the other NATS servers reach it by
        /// (repeatable).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// Lifetime in days (default 365).
        #[arg(long)]
        days: Option<u32>,
        /// Where to write the files.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

/// `portcullis server-cert …`
#[derive(Debug, Subcommand)]
pub enum ServerCertCommand {
    /// Import (or replace, for a renewal) a server certificate and its key into the registry:
    /// the key is sealed under the node's cluster key. Domains use it with
    /// `certificate = "registry:NAME"`.
    Import {
        /// Name: 1-128 of A-Z a-z 0-9 : _ - .
        name: String,
        /// The chain, leaf first (PEM or DER).
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// The leaf's private key (PEM or DER: PKCS#8, PKCS#1, SEC1).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// List the registry's server certificates.
    List,
    /// Show a server certificate and the domains serving it.
    Describe {
        /// Name.
        name: String,
    },
    /// Delete a server certificate no domain serves.
    Delete {
        /// Name.
        name: String,
    },
}

/// `portcullis policy …`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Create a policy from a JSON document (version 1, the default).
    Create {
        /// Name: 1-128 of A-Z a-z 0-9 : _ - .
        name: String,
        /// The document (JSON).
        #[arg(long, value_name = "FILE")]
        document: PathBuf,
    },
    /// Add a version (at most 5 are kept).
    CreateVersion {
        /// Name.
        name: String,
        /// The document (JSON).
        #[arg(long, value_name = "FILE")]
        document: PathBuf,
        /// Make it the version in effect.
        #[arg(long)]
        set_default: bool,
    },
    /// Make a kept version the one in effect.
    #[command(disable_version_flag = true)]
    SetDefault {
        /// Name.
        name: String,
        /// Version number.
        #[arg(long)]
        version: i64,
    },
    /// Delete a version that is not the default.
    #[command(disable_version_flag = true)]
    DeleteVersion {
        /// Name.
        name: String,
        /// Version number.
        #[arg(long)]
        version: i64,
    },
    /// Show a policy: versions, targets, and the document (default version unless --version).
    #[command(disable_version_flag = true)]
    Get {
        /// Name.
        name: String,
        /// Version number.
        #[arg(long)]
        version: Option<i64>,
    },
    /// List policies.
    List,
    /// Attach a policy to a certificate, thing, CA or domain.
    Attach(PolicyTargetArgs),
    /// Detach a policy.
    Detach(PolicyTargetArgs),
    /// Delete a policy attached to nothing.
    Delete {
        /// Name.
        name: String,
    },
    /// Evaluate the policies that apply to a certificate for one action on one resource: the
    /// decision, the statement that made it, and the variables' values. Exit 1 when denied.
    Simulate(SimulateArgs),
}

#[derive(Debug, Args)]
pub struct PolicyTargetArgs {
    /// Policy name.
    name: String,
    #[command(flatten)]
    target: TargetArg,
}

/// Exactly one target.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct TargetArg {
    /// A certificate id.
    #[arg(long)]
    cert: Option<String>,
    /// A thing name.
    #[arg(long)]
    thing: Option<String>,
    /// A registered CA id (applies to the certificates registered with it).
    #[arg(long)]
    ca: Option<String>,
    /// A domain hostname (applies to every request on it).
    #[arg(long)]
    domain: Option<String>,
}

impl PolicyTargetArgs {
    /// `type/target` for the API path.
    fn path(&self) -> String {
        let t = &self.target;
        let (kind, id) = match (&t.cert, &t.thing, &t.ca, &t.domain) {
            (Some(c), _, _, _) => ("certificate", c),
            (_, Some(t), _, _) => ("thing", t),
            (_, _, Some(c), _) => ("ca", c),
            (_, _, _, Some(d)) => ("domain", d),
            // clap requires exactly one.
            _ => ("certificate", &self.name),
        };
        format!(
            "/v1/policies/{}/targets/{kind}/{}",
            segment(&self.name),
            segment(id)
        )
    }
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// The client certificate, or its chain (leaf first).
    #[arg(long, value_name = "FILE")]
    cert: PathBuf,
    /// The action: http:GET, mqtt:Publish…
    #[arg(long)]
    action: String,
    /// The resource: route:DOMAIN/PATH, topic:NAME, client:ID, topicfilter:FILTER.
    #[arg(long)]
    resource: String,
    /// The client's address (IpAddress conditions).
    #[arg(long)]
    source_ip: Option<String>,
    /// The MQTT client id (${mqtt:ClientId}).
    #[arg(long)]
    client_id: Option<String>,
    /// Evaluate these policies instead of those attached (repeatable).
    #[arg(long = "policy", value_name = "NAME")]
    policies: Vec<String>,
    /// The domain whose policies apply (default: the one a route: resource names).
    #[arg(long)]
    domain: Option<String>,
}

/// `portcullis sessions …`
#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// MQTT sessions: online or stored, identity, subscriptions, queued messages.
    List,
    /// Close an MQTT session's connection now.
    Disconnect {
        /// The client id.
        client_id: String,
        /// Also drop the stored session (subscriptions and queued messages).
        #[arg(long)]
        forget: bool,
    },
}

/// `portcullis webhook …`
#[derive(Debug, Subcommand)]
pub enum WebhookCommand {
    /// Subscribe a URL to events; prints the signing secret once.
    Create {
        /// Name: 1-128 of A-Z a-z 0-9 : _ - .
        name: String,
        /// Where events are POSTed (https:// recommended).
        #[arg(long)]
        url: String,
        /// An event type (repeatable, or comma-separated): certificate.registered,
        /// certificate.pending_activation, certificate.status_changed, certificate.expiring,
        /// ca.registered, ca.status_changed, ca.expiring, truststore.version_added,
        /// mqtt.message (forwarding rules, with --topic-filter), and
        /// provisioning.pre_provision (a fleet provisioning template's pre-provisioning hook,
        /// called before each registration).
        #[arg(long = "event", value_delimiter = ',', required = true)]
        events: Vec<String>,
        /// For *.expiring events: how many days ahead.
        #[arg(long, default_value_t = 30)]
        expiring_days: i64,
        /// The CA bundle the receiver's certificate chains to (default: the system's roots).
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// With --event mqtt.message (a forwarding rule): the MQTT topic filter.
        #[arg(long, value_name = "FILTER")]
        topic_filter: Option<String>,
    },
    /// List webhooks.
    List,
    /// Show a webhook (by id or name).
    Describe {
        /// Id or name.
        id: String,
    },
    /// Change a webhook.
    Update {
        /// Id or name.
        id: String,
        /// New URL.
        #[arg(long)]
        url: Option<String>,
        /// New event types (repeatable, or comma-separated).
        #[arg(long = "event", value_delimiter = ',')]
        events: Vec<String>,
        /// Deliver (on) or hold deliveries (off).
        #[arg(long, value_name = "on|off")]
        enabled: Option<String>,
        /// Days ahead for *.expiring events.
        #[arg(long)]
        expiring_days: Option<i64>,
        /// A new CA bundle for the receiver.
        #[arg(long, value_name = "FILE", conflicts_with = "system_roots")]
        ca: Option<PathBuf>,
        /// Check the receiver against the system's roots again.
        #[arg(long)]
        system_roots: bool,
    },
    /// Delete a webhook and its deliveries.
    Delete {
        /// Id or name.
        id: String,
    },
    /// A webhook's deliveries, newest first.
    Deliveries {
        /// Id or name.
        id: String,
        /// pending, delivered or failed.
        #[arg(long)]
        status: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Send a delivery's event again (a new delivery).
    Replay {
        /// Delivery id (dl_…).
        delivery: String,
    },
    /// Look for expiring certificates and CAs now (the gateway also does daily).
    CheckExpiry,
}

/// `portcullis domain …`
#[derive(Debug, Subcommand)]
pub enum DomainCommand {
    /// List domains.
    List,
    /// Show a domain as a `[[domain]]` table of the configuration file (JSON with --json).
    Describe {
        /// Hostname (or `*.suffix`).
        hostname: String,
    },
    /// Create or replace a domain from a file holding one `[[domain]]` table (TOML, as in the
    /// configuration file) or its JSON. The gateway checks it before it is stored; it is live
    /// within a second. Relative paths are relative to the gateway's configuration file.
    Put {
        /// The domain (TOML or JSON).
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// Only if the stored domain is still at this version (0: only if it is new).
        #[arg(long, value_name = "N")]
        if_version: Option<i64>,
    },
    /// Delete a domain: connections naming it are refused (or served by the default domain).
    Delete {
        /// Hostname.
        hostname: String,
        /// Only if the stored domain is still at this version.
        #[arg(long, value_name = "N")]
        if_version: Option<i64>,
    },
}

/// `portcullis audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// The newest entries first.
    List {
        /// Only actions starting with this (`certificate.`, `ca.register`…).
        #[arg(long)]
        action: Option<String>,
        /// Only entries about this target.
        #[arg(long)]
        target: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

/// `portcullis admin …`
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Bearer tokens for the admin API.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The admin client certificate: rotate it, list and revoke old ones.
    #[command(subcommand)]
    Cert(AdminCertCommand),
}

#[derive(Debug, Subcommand)]
pub enum AdminCertCommand {
    /// Issue a new admin client certificate (the node puts it in its data dir) and revoke the
    /// one it replaces, on every node at once.
    Rotate {
        /// Also write the new certificate, key and .p12 here (for a remote operator).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Overwrite files in --out.
        #[arg(long)]
        force: bool,
    },
    /// The node's current admin certificate, those rotations issued, and those revoked.
    List,
    /// Revoke an admin client certificate by id (a copy that leaked; rotate the current one).
    Revoke {
        /// Certificate id (64 hex).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token; it is printed once (only its hash is stored).
    Create {
        /// What it is for.
        #[arg(long)]
        name: String,
    },
    /// List tokens (never the secrets).
    List,
    /// Delete a token.
    Delete {
        /// Token id.
        id: String,
    },
}

/// `portcullis explain`
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The domain (SNI) the client connects to.
    #[arg(long)]
    domain: String,
    /// The Host header, when it is not the domain.
    #[arg(long)]
    host: Option<String>,
    /// The client's address, for policies' aws:SourceIp conditions (default 127.0.0.1).
    #[arg(long, value_name = "IP")]
    source_ip: Option<String>,
    /// HTTP method.
    #[arg(long, default_value = "GET")]
    method: String,
    /// Request path.
    #[arg(long, default_value = "/")]
    path: String,
    /// Verify under this profile (compatible or strict) instead of the domain's.
    #[arg(long, value_parser = ["compatible", "strict"])]
    profile: Option<String>,
    /// The client certificate, or its chain (leaf first).
    cert: PathBuf,
}

/// `portcullis enroll`
#[derive(Debug, Args)]
pub struct EnrollArgs {
    /// The device's common name (CN).
    #[arg(long, value_name = "NAME")]
    cn: String,
    /// Where to write NAME.p12, NAME-legacy.p12 and NAME.mobileconfig (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Validity in days (default: the client profile's).
    #[arg(long)]
    days: Option<u32>,
    /// The bundles' password, read from the first line of FILE (default: a random one, printed
    /// once and written nowhere).
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// Also write the password into the .mobileconfig, for a silent MDM install. Off by default:
    /// a file carrying both the key and its password is a leak, and MDMs can supply it.
    #[arg(long)]
    embed_password: bool,
    /// Issue a CN holding `/ + # * ? $` (policies never substitute such a value).
    #[arg(long)]
    allow_separators: bool,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

/// The control-plane commands.
#[derive(Debug)]
pub enum Control {
    Ca(CaCommand),
    Cert(CertCommand),
    Thing(ThingCommand),
    Truststore(TruststoreCommand),
    ServerCert(ServerCertCommand),
    Cluster(ClusterCommand),
    Domain(DomainCommand),
    Policy(PolicyCommand),
    ProvisioningTemplate(ProvisioningTemplateCommand),
    Webhook(WebhookCommand),
    Sessions(SessionsCommand),
    Audit(AuditCommand),
    Admin(AdminCommand),
    Explain(ExplainArgs),
    Enroll(EnrollArgs),
}

/// Runs a control-plane command.
pub fn run(command: Control, connect: Connect) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let client = AdminClient::new(&connect)?;
        let out = Printer { json: connect.json };
        match command {
            Control::Ca(c) => ca(&client, &out, c).await,
            Control::Cert(c) => cert(&client, &out, c).await,
            Control::ProvisioningTemplate(c) => provisioning_template(&client, &out, c).await,
            Control::Thing(c) => thing(&client, &out, c).await,
            Control::Truststore(c) => truststore(&client, &out, c).await,
            Control::ServerCert(c) => server_cert(&client, &out, c).await,
            Control::Cluster(ClusterCommand::Status) => {
                let v = client.get("/v1/cluster").await?;
                out.show(&v, |v| {
                    let mut lines = vec![format!("newest change {}", s(&v["newest_change"]))];
                    for n in v["nodes"].as_array().into_iter().flatten() {
                        let nats = match n["nats"].as_str() {
                            Some(nats) => format!("  NATS: {nats}"),
                            None => String::new(),
                        };
                        lines.push(format!(
                            "{}  {}  v{}  heartbeat {} ms ago  snapshot {} changes behind (checked {} ms ago)  {} connections  {} MQTT sessions{nats}",
                            s(&n["id"]),
                            if n["stale"] == true { "STALE" } else { "up" },
                            s(&n["version"]),
                            s(&n["heartbeat_age_ms"]),
                            s(&n["changes_behind"]),
                            s(&n["snapshot_age_ms"]),
                            s(&n["connections"]),
                            s(&n["mqtt_sessions"])
                        ));
                    }
                    lines.join("\n")
                });
                Ok(ExitCode::SUCCESS)
            }
            Control::Cluster(ClusterCommand::NatsCert {
                name,
                hosts,
                days,
                out: dir,
                force,
            }) => {
                let mut body = json!({"name": name, "hosts": hosts});
                if let Some(days) = days {
                    body["days"] = json!(days);
                }
                let stem = portcullis_admin::enroll::file_stem(&name);
                let mut files = portcullis_node::output::Outputs::default();
                files.public(dir.join(format!("{stem}.pem")), Vec::new());
                files.secret(dir.join(format!("{stem}.key")), Vec::new());
                files.check_absent(force)?;
                let v = client.post("/v1/cluster/nats-certificates", &body).await?;
                let text = |k: &str| v[k].as_str().unwrap_or_default().as_bytes().to_vec();
                let mut files = portcullis_node::output::Outputs::default();
                files.public(dir.join(format!("{stem}.pem")), text("certificate_pem"));
                files.secret(dir.join(format!("{stem}.key")), text("key_pem"));
                files.public(dir.join("ca.pem"), text("ca_pem"));
                // ca.pem is the same for every NATS server: replaced freely.
                let written = files.write(true)?;
                out.show(
                    &json!({"name": v["name"], "not_after": v["not_after"], "files": written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>()}),
                    |v| {
                        format!(
                            "NATS certificate for {} (valid until {}): {}",
                            s(&v["name"]),
                            s(&v["not_after"]),
                            v["files"].as_array().into_iter().flatten().map(s).collect::<Vec<_>>().join(", ")
                        )
                    },
                );
                Ok(ExitCode::SUCCESS)
            }
            Control::Domain(c) => domain(&client, &out, c).await,
            Control::Policy(c) => policy(&client, &out, c).await,
            Control::Webhook(c) => webhook(&client, &out, c).await,
            Control::Sessions(c) => sessions(&client, &out, c).await,
            Control::Audit(c) => audit(&client, &out, c).await,
            Control::Admin(AdminCommand::Token(c)) => token(&client, &out, c).await,
            Control::Admin(AdminCommand::Cert(c)) => admin_cert(&client, &out, c).await,
            Control::Explain(a) => explain(&client, &out, a).await,
            Control::Enroll(a) => enroll(&client, &out, a).await,
        }
    })
}

struct Printer {
    json: bool,
}

impl Printer {
    /// JSON as is, or the text `f` makes of it.
    fn show(&self, value: &Value, f: impl FnOnce(&Value) -> String) {
        if self.json {
            outln!(
                "{}",
                serde_json::to_string_pretty(value).unwrap_or_default()
            );
        } else {
            let text = f(value);
            if !text.is_empty() {
                outln!("{}", text.trim_end());
            }
        }
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn when(v: &Value) -> String {
    v.as_i64()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".into())
}

fn pem_text(path: &Path, what: &str) -> Result<String> {
    String::from_utf8(read(path, what)?).or_else(|e| {
        // DER: send it as PEM.
        let certs = portcullis_pki::Certificate::all_from_pem_or_der(e.as_bytes())
            .with_context(|| format!("reading {what} {}", path.display()))?;
        Ok(certs
            .iter()
            .map(portcullis_pki::Certificate::to_pem)
            .collect())
    })
}

fn ca_text(v: &Value) -> String {
    format!(
        "{}  {}  {}{}{}{}\n  subject: {}\n  expires: {}{}",
        s(&v["id"]),
        s(&v["status"]),
        if v["verified"] == true {
            "verified"
        } else {
            "UNVERIFIED"
        },
        if v["auto_registration"] == true {
            ", auto-registration"
        } else {
            ""
        },
        if v["provisioning_template"].is_object() {
            ", provisioning template"
        } else {
            ""
        },
        match v["claim_templates"].as_array() {
            Some(t) => format!(
                ", claim CA for {}",
                t.iter().map(s).collect::<Vec<_>>().join(", ")
            ),
            None => String::new(),
        },
        s(&v["subject"]),
        when(&v["not_after"]),
        match v["revoked_certificates"].as_u64() {
            Some(n) if n > 0 => format!("\n  revoked {n} certificate(s) it issued"),
            _ => String::new(),
        }
    )
}

fn cert_text(v: &Value) -> String {
    let things: Vec<String> = v["things"]
        .as_array()
        .map(|a| a.iter().map(s).collect())
        .unwrap_or_default();
    format!(
        "{}  {}\n  subject: {}\n  issuer: {}  (registered CA: {})\n  expires: {}  last seen: {}{}",
        s(&v["id"]),
        s(&v["status"]),
        s(&v["subject"]),
        s(&v["issuer"]),
        s(&v["ca_id"]),
        when(&v["not_after"]),
        when(&v["last_seen"]),
        if things.is_empty() {
            String::new()
        } else {
            format!("\n  things: {}", things.join(", "))
        }
    )
}

fn thing_text(v: &Value) -> String {
    let mut out = format!("{}  (version {})\n", s(&v["name"]), s(&v["version"]));
    if let Some(attrs) = v["attributes"].as_object() {
        for (k, val) in attrs {
            out.push_str(&format!("  {k} = {}\n", s(val)));
        }
    }
    for c in v["certificates"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  certificate {}{}\n",
            s(&c["certificate_id"]),
            if c["exclusive"] == true {
                " (exclusive)"
            } else {
                ""
            }
        ));
    }
    out
}

fn items(v: &Value) -> impl Iterator<Item = &Value> {
    v["items"].as_array().into_iter().flatten()
}

async fn ca(client: &AdminClient, out: &Printer, command: CaCommand) -> Result<ExitCode> {
    match command {
        CaCommand::RegistrationCode => {
            let v = client.get("/v1/registration-code").await?;
            out.show(&v, |v| s(&v["registration_code"]));
        }
        CaCommand::Register(a) => {
            let template = a
                .template
                .as_ref()
                .map(|t| -> Result<Value> {
                    serde_json::from_slice(&read(t, "provisioning template")?)
                        .with_context(|| format!("{}: not JSON", t.display()))
                })
                .transpose()?;
            let body = json!({
                "certificate_pem": pem_text(&a.cert, "CA certificate")?,
                "verification_certificate_pem": a.verification_cert.as_ref().map(|p| pem_text(p, "verification certificate")).transpose()?,
                "allow_unverified": a.no_verification,
                "activate": a.activate,
                "auto_registration": a.auto_register,
                "provisioning_template": template,
            });
            let v = client.post("/v1/cas", &body).await?;
            out.show(&v, |v| format!("registered CA {}", ca_text(v)));
        }
        CaCommand::List => {
            let v = client.get("/v1/cas").await?;
            out.show(&v, |v| items(v).map(ca_text).collect::<Vec<_>>().join("\n"));
        }
        CaCommand::Describe { id } => {
            let v = client.get(&format!("/v1/cas/{}", segment(&id))).await?;
            out.show(&v, ca_text);
        }
        CaCommand::Update(a) => {
            let mut body = serde_json::Map::new();
            if let Some(st) = &a.status {
                body.insert("status".into(), json!(st.to_ascii_uppercase()));
            }
            if let Some(flag) = &a.auto_register {
                let on = match flag.as_str() {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    other => bail!("--auto-register '{other}' must be on or off"),
                };
                body.insert("auto_registration".into(), json!(on));
            }
            if let Some(t) = &a.template {
                let template: Value = serde_json::from_slice(&read(t, "provisioning template")?)
                    .with_context(|| format!("{}: not JSON", t.display()))?;
                body.insert("provisioning_template".into(), template);
            }
            if a.no_template {
                body.insert("provisioning_template".into(), Value::Null);
            }
            if a.revoke_issued {
                body.insert("revoke_issued".into(), json!(true));
            }
            if !a.claim_templates.is_empty() {
                body.insert("claim_templates".into(), json!(a.claim_templates));
            }
            if a.no_claim {
                body.insert("claim_templates".into(), Value::Null);
            }
            if body.is_empty() {
                bail!(
                    "nothing to change: give --status, --auto-register, --template, --no-template, --revoke-issued, --claim-templates or --no-claim"
                );
            }
            let v = client
                .patch(&format!("/v1/cas/{}", segment(&a.id)), &Value::Object(body))
                .await?;
            out.show(&v, ca_text);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn cert(client: &AdminClient, out: &Printer, command: CertCommand) -> Result<ExitCode> {
    match command {
        CertCommand::Register(a) => {
            if let Some(dir) = &a.bulk {
                return bulk_register(client, out, dir, &a.status, a.concurrency, a.batch).await;
            }
            let path = a
                .cert
                .as_ref()
                .ok_or_else(|| anyhow!("--cert FILE or --bulk DIR"))?;
            let mut body = json!({"certificate_pem": pem_text(path, "certificate")?, "status": a.status.to_ascii_uppercase()});
            if let Some(t) = &a.renewal_template {
                body["renewal_template"] = json!(t);
            }
            let v = client.post("/v1/certificates", &body).await?;
            out.show(&v, |v| format!("registered {}", cert_text(v)));
        }
        CertCommand::Create(a) => {
            let mut body = json!({"status": a.status.to_ascii_uppercase(), "days": a.days, "allow_separators": a.allow_separators});
            match (&a.csr, &a.common_name) {
                (Some(csr), _) => {
                    body["csr_pem"] = json!(String::from_utf8_lossy(&read(csr, "CSR")?))
                }
                (None, Some(cn)) => {
                    body["common_name"] = json!(cn);
                    body["key_type"] = json!(a.key_type);
                }
                (None, None) => bail!("give --csr FILE or --common-name CN"),
            }
            // Refuse before asking the API to issue anything.
            refuse_existing(&a.out, a.force)?;
            let v = client.post("/v1/certificates", &body).await?;
            write_issued(out, &v, &a.out, a.force, "created")?;
        }
        CertCommand::List(a) => {
            let mut query = vec![format!("limit={}", a.limit)];
            if let Some(st) = &a.status {
                query.push(format!("status={}", segment(&st.to_ascii_uppercase())));
            }
            if let Some(ca) = &a.ca {
                query.push(format!("ca={}", segment(ca)));
            }
            if let Some(t) = &a.thing {
                query.push(format!("thing={}", segment(t)));
            }
            if let Some(days) = a.expiring_within {
                let before =
                    time::OffsetDateTime::now_utc().unix_timestamp() + i64::from(days) * 86_400;
                query.push(format!("expiring_before={before}"));
            }
            let mut after = a.after.clone();
            let mut all = Vec::new();
            let next = loop {
                let mut q = query.clone();
                if let Some(after) = &after {
                    q.push(format!("after={}", segment(after)));
                }
                let page = client
                    .get(&format!("/v1/certificates?{}", q.join("&")))
                    .await?;
                all.extend(items(&page).cloned());
                match (&page["next"], a.all) {
                    (Value::String(n), true) => after = Some(n.clone()),
                    (next, _) => break next.clone(),
                }
            };
            let v = json!({"items": all, "next": next});
            out.show(&v, |v| {
                let mut text: Vec<String> = items(v).map(cert_text).collect();
                if let Some(n) = v["next"].as_str() {
                    text.push(format!("(more: --after {n}, or --all)"));
                }
                if text.is_empty() {
                    "no certificates".into()
                } else {
                    text.join("\n")
                }
            });
        }
        CertCommand::Describe { id } => {
            let v = client
                .get(&format!("/v1/certificates/{}", segment(&id)))
                .await?;
            out.show(&v, cert_text);
        }
        CertCommand::Update { id, status, reason } => {
            let mut body = json!({"status": status.to_ascii_uppercase()});
            if let Some(reason) = reason {
                body["reason"] = json!(reason);
            }
            let v = client
                .patch(&format!("/v1/certificates/{}", segment(&id)), &body)
                .await?;
            out.show(&v, cert_text);
        }
        CertCommand::Delete { id } => {
            client
                .delete(&format!("/v1/certificates/{}", segment(&id)))
                .await?;
            out.show(&json!({"deleted": id}), |_| format!("deleted {id}"));
        }
        CertCommand::Renew {
            id,
            csr,
            key_type,
            days,
            out: dir,
            force,
        } => {
            let mut body = json!({"days": days});
            match &csr {
                Some(csr) => body["csr_pem"] = json!(String::from_utf8_lossy(&read(csr, "CSR")?)),
                None => body["key_type"] = json!(key_type),
            }
            refuse_existing(&dir, force)?;
            let v = client
                .post(&format!("/v1/certificates/{}/renew", segment(&id)), &body)
                .await?;
            write_issued(out, &v, &dir, force, &format!("renewed {id}\n"))?;
        }
        CertCommand::Renewal => {
            let v = client.get("/v1/renewal").await?;
            out.show(&v, |v| {
                format!(
                    "due for renewal: {}\nin grace (expired, may only renew): {}\noverdue (expired, still ACTIVE): {}\nrenewals issued: {}",
                    s(&v["due"]),
                    s(&v["in_grace"]),
                    s(&v["overdue"]),
                    s(&v["renewed"])
                )
            });
        }
        CertCommand::Claim {
            id,
            templates,
            clear,
        } => {
            let path = format!("/v1/certificates/{}/claim", segment(&id));
            let v = if clear {
                client.delete(&path).await?
            } else {
                client
                    .put(&path, Some(&json!({"templates": templates})))
                    .await?
            };
            out.show(&v, |v| {
                let claim = match v["claim_templates"].as_array() {
                    Some(t) => format!(
                        "claim certificate for template(s) {}",
                        t.iter().map(s).collect::<Vec<_>>().join(", ")
                    ),
                    None => "an ordinary certificate (not a claim)".to_string(),
                };
                format!("{}\n  {claim}", cert_text(v))
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses, before anything is issued, to write over an existing `DIR/cert.pem`.
fn refuse_existing(dir: &std::path::Path, force: bool) -> Result<()> {
    let mut files = Outputs::default();
    files.public(dir.join("cert.pem"), "");
    files.check_absent(force)
}

/// Writes what the API issued (`cert.pem`, `chain.pem`, and `key.pem` 0600 when a key was made)
/// and shows the certificate without its key: the key is in the file, never on the terminal.
fn write_issued(
    out: &Printer,
    v: &Value,
    dir: &std::path::Path,
    force: bool,
    what: &str,
) -> Result<()> {
    let mut files = Outputs::default();
    files.public(dir.join("cert.pem"), s(&v["pem"]));
    if let Some(chain) = v["chain_pem"].as_str() {
        files.public(dir.join("chain.pem"), chain);
    }
    if let Some(key) = v["private_key_pem"].as_str() {
        files.secret(dir.join("key.pem"), key);
    }
    let written = files.write(force)?;
    let mut shown = v.clone();
    if let Some(o) = shown.as_object_mut() {
        o.remove("private_key_pem");
    }
    out.show(&shown, |v| {
        format!(
            "{what} {}\nwrote {}",
            cert_text(v),
            written
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    });
    Ok(())
}

fn template_text(v: &Value) -> String {
    format!(
        "{}  {}  version {}  updated {}{}\n{}",
        s(&v["name"]),
        if v["enabled"] == true {
            "enabled"
        } else {
            "DISABLED"
        },
        s(&v["version"]),
        when(&v["updated_at"]),
        match v["description"].as_str() {
            Some(d) if !d.is_empty() => format!("\n  {d}"),
            _ => String::new(),
        },
        serde_json::to_string_pretty(&v["template"]).unwrap_or_default()
    )
}

async fn provisioning_template(
    client: &AdminClient,
    out: &Printer,
    command: ProvisioningTemplateCommand,
) -> Result<ExitCode> {
    let document = |path: &PathBuf| -> Result<Value> {
        serde_json::from_slice(&read(path, "provisioning template")?)
            .with_context(|| format!("{}: not JSON", path.display()))
    };
    match command {
        ProvisioningTemplateCommand::Create {
            name,
            file,
            description,
            disabled,
        } => {
            let body = json!({"name": name, "description": description, "enabled": !disabled, "template": document(&file)?});
            let v = client.post("/v1/provisioning-templates", &body).await?;
            out.show(&v, |v| format!("created {}", template_text(v)));
        }
        ProvisioningTemplateCommand::List => {
            let v = client.get("/v1/provisioning-templates").await?;
            out.show(&v, |v| {
                items(v)
                    .map(|t| {
                        format!(
                            "{}  {}  version {}  {}",
                            s(&t["name"]),
                            if t["enabled"] == true {
                                "enabled"
                            } else {
                                "DISABLED"
                            },
                            s(&t["version"]),
                            s(&t["description"])
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        ProvisioningTemplateCommand::Describe { name } => {
            let v = client
                .get(&format!("/v1/provisioning-templates/{}", segment(&name)))
                .await?;
            out.show(&v, template_text);
        }
        ProvisioningTemplateCommand::Update {
            name,
            file,
            description,
            enable,
            disable,
        } => {
            let mut body = json!({});
            if let Some(f) = &file {
                body["template"] = document(f)?;
            }
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            if enable || disable {
                body["enabled"] = json!(enable);
            }
            if body.as_object().is_some_and(|o| o.is_empty()) {
                bail!("nothing to change: give --file, --description, --enable or --disable");
            }
            let v = client
                .patch(
                    &format!("/v1/provisioning-templates/{}", segment(&name)),
                    &body,
                )
                .await?;
            out.show(&v, |v| format!("updated {}", template_text(v)));
        }
        ProvisioningTemplateCommand::Codes {
            name,
            count,
            ttl_hours,
        } => {
            let v = client
                .post(
                    &format!(
                        "/v1/provisioning-templates/{}/enrollment-codes",
                        segment(&name)
                    ),
                    &json!({"count": count, "ttl_hours": ttl_hours}),
                )
                .await?;
            out.show(&v, |v| {
                let mut lines: Vec<String> = v["codes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|c| s(c).to_string())
                    .collect();
                lines.push(format!(
                    "(one-time, template {name}, until {})",
                    when(&v["expires_at"])
                ));
                lines.join("\n")
            });
        }
        ProvisioningTemplateCommand::Mobileconfig {
            name,
            cn,
            url,
            out: file,
            ttl_hours,
            key_size,
            force,
        } => {
            if file.exists() && !force {
                bail!(
                    "{} already exists; choose another --out or pass --force to overwrite it",
                    file.display()
                );
            }
            let v = client
                .post(
                    "/v1/enrollments/scep",
                    &json!({"template": name, "scep_url": url, "common_name": cn,
                            "ttl_hours": ttl_hours, "key_size": key_size}),
                )
                .await?;
            let bytes = base64::Engine::decode(
                &base64::engine::general_purpose::STANDARD,
                v["files"]["mobileconfig"]["base64"]
                    .as_str()
                    .unwrap_or_default(),
            )
            .context("the admin API answered with a profile that is not base64")?;
            let mut files = portcullis_node::output::Outputs::default();
            files.secret(&file, bytes);
            files.write(force)?;
            let shown = json!({"file": file.display().to_string(), "template": name,
                               "expires_at": v["expires_at"]});
            out.show(&shown, |v| {
                format!(
                    "wrote {} (SCEP enrollment of {cn} under template {name}, one-time challenge until {})",
                    s(&v["file"]),
                    when(&v["expires_at"])
                )
            });
        }
        ProvisioningTemplateCommand::Delete { name } => {
            client
                .delete(&format!("/v1/provisioning-templates/{}", segment(&name)))
                .await?;
            out.show(&json!({"deleted": name}), |_| {
                format!("deleted provisioning template {name}")
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Registers every certificate file in `dir` in batches (one transaction each, so one disk
/// sync per batch), a few batches at a time, with a progress bar and a summary. A batch is
/// acknowledged only once committed: an interruption loses nothing acknowledged and leaves no
/// partial batch, and running again skips what is registered already.
async fn bulk_register(
    client: &AdminClient,
    out: &Printer,
    dir: &Path,
    status: &str,
    concurrency: usize,
    batch: usize,
) -> Result<ExitCode> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e, "pem" | "crt" | "cer"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{} holds no .pem, .crt or .cer files", dir.display());
    }
    let started = std::time::Instant::now();
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(files.len() as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} certificates  {per_sec}  eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let client = Arc::new(client.clone());
    let status = status.to_ascii_uppercase();
    let limit = Arc::new(tokio::sync::Semaphore::new(concurrency.clamp(1, 16)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut counts = Counts::default();
    for chunk in files.chunks(batch.clamp(1, 1000)) {
        let permit = limit.clone().acquire_owned().await?;
        let (client, status, chunk) = (client.clone(), status.clone(), chunk.to_vec());
        tasks.spawn(async move {
            let outcome = register_chunk(&client, &status, &chunk).await;
            drop(permit);
            outcome
        });
        while let Some(done) = tasks.try_join_next() {
            tally(done, &bar, &mut counts);
        }
    }
    while let Some(done) = tasks.join_next().await {
        tally(done, &bar, &mut counts);
    }
    bar.finish_and_clear();
    let Counts {
        registered,
        existing,
        failed,
    } = counts;
    let elapsed = started.elapsed().as_secs_f64();
    let summary = json!({
        "files": files.len(),
        "registered": registered,
        "already_registered": existing,
        "failed": failed.len(),
        "failures": failed.iter().map(|(p, e)| json!({"file": p, "error": e})).collect::<Vec<_>>(),
        "seconds": elapsed,
        "per_second": if elapsed > 0.0 { registered as f64 / elapsed } else { 0.0 },
    });
    out.show(&summary, |v| {
        let mut text = format!(
            "{} files: {} registered, {} already registered, {} failed in {:.1} s ({:.0}/s)",
            v["files"],
            v["registered"],
            v["already_registered"],
            v["failed"],
            elapsed,
            v["per_second"].as_f64().unwrap_or_default()
        );
        for f in v["failures"].as_array().into_iter().flatten().take(20) {
            text.push_str(&format!("\n  {}: {}", s(&f["file"]), s(&f["error"])));
        }
        text
    });
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// One outcome per file of a batch: registered, already registered, or failed with a reason.
enum FileOutcome {
    Registered,
    Existing,
    Failed(String),
}

/// Sends one batch; files that cannot be read fail alone, a failed request fails the batch.
async fn register_chunk(
    client: &AdminClient,
    status: &str,
    chunk: &[PathBuf],
) -> Vec<(PathBuf, FileOutcome)> {
    let mut outcomes: Vec<(PathBuf, FileOutcome)> = Vec::with_capacity(chunk.len());
    let mut sent: Vec<(PathBuf, String)> = Vec::with_capacity(chunk.len());
    for path in chunk {
        match pem_text(path, "certificate") {
            Ok(pem) => sent.push((path.clone(), pem)),
            Err(e) => outcomes.push((path.clone(), FileOutcome::Failed(format!("{e:#}")))),
        }
    }
    if sent.is_empty() {
        return outcomes;
    }
    let body = json!({
        "certificates_pem": sent.iter().map(|(_, pem)| pem).collect::<Vec<_>>(),
        "status": status,
    });
    match client.post("/v1/certificates/batch", &body).await {
        Ok(v) => {
            let items = v["items"].as_array().cloned().unwrap_or_default();
            for (i, (path, _)) in sent.into_iter().enumerate() {
                let item = items.get(i).cloned().unwrap_or(Value::Null);
                let outcome = match item["outcome"].as_str() {
                    Some("registered") => FileOutcome::Registered,
                    Some("exists") => FileOutcome::Existing,
                    _ => FileOutcome::Failed(
                        item["message"]
                            .as_str()
                            .unwrap_or("no answer for this file")
                            .to_string(),
                    ),
                };
                outcomes.push((path, outcome));
            }
        }
        Err(e) => {
            let why = format!("{e:#}");
            outcomes.extend(
                sent.into_iter()
                    .map(|(path, _)| (path, FileOutcome::Failed(why.clone()))),
            );
        }
    }
    outcomes
}

#[derive(Default)]
struct Counts {
    registered: usize,
    existing: usize,
    failed: Vec<(String, String)>,
}

fn tally(
    done: std::result::Result<Vec<(PathBuf, FileOutcome)>, tokio::task::JoinError>,
    bar: &indicatif::ProgressBar,
    counts: &mut Counts,
) {
    match done {
        Ok(outcomes) => {
            bar.inc(outcomes.len() as u64);
            for (path, outcome) in outcomes {
                match outcome {
                    FileOutcome::Registered => counts.registered += 1,
                    FileOutcome::Existing => counts.existing += 1,
                    FileOutcome::Failed(why) => {
                        counts.failed.push((path.display().to_string(), why));
                    }
                }
            }
        }
        Err(e) => counts.failed.push(("?".into(), e.to_string())),
    }
}

fn attributes(pairs: &[String]) -> Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow!("--attr '{p}' must be KEY=VALUE"))
        })
        .collect()
}

async fn thing(client: &AdminClient, out: &Printer, command: ThingCommand) -> Result<ExitCode> {
    match command {
        ThingCommand::Create {
            name,
            attributes: a,
        } => {
            let v = client
                .post(
                    "/v1/things",
                    &json!({"name": name, "attributes": attributes(&a)?}),
                )
                .await?;
            out.show(&v, |v| format!("created thing {}", thing_text(v)));
        }
        ThingCommand::List { after, limit } => {
            let mut q = format!("/v1/things?limit={limit}");
            if let Some(a) = after {
                q.push_str(&format!("&after={}", segment(&a)));
            }
            let v = client.get(&q).await?;
            out.show(&v, |v| {
                let text: Vec<String> = items(v).map(thing_text).collect();
                if text.is_empty() {
                    "no things".into()
                } else {
                    text.join("")
                }
            });
        }
        ThingCommand::Describe { name } => {
            let v = client
                .get(&format!("/v1/things/{}", segment(&name)))
                .await?;
            out.show(&v, thing_text);
        }
        ThingCommand::Update {
            name,
            attributes: a,
            remove,
        } => {
            let mut changes: BTreeMap<String, Option<String>> = attributes(&a)?
                .into_iter()
                .map(|(k, v)| (k, Some(v)))
                .collect();
            for k in remove {
                changes.insert(k, None);
            }
            let v = client
                .patch(
                    &format!("/v1/things/{}", segment(&name)),
                    &json!({"attributes": changes}),
                )
                .await?;
            out.show(&v, thing_text);
        }
        ThingCommand::Delete { name } => {
            client
                .delete(&format!("/v1/things/{}", segment(&name)))
                .await?;
            out.show(&json!({"deleted": name}), |_| {
                format!("deleted thing {name}")
            });
        }
        ThingCommand::Attach {
            name,
            certificate,
            exclusive,
        } => {
            let v = client
                .put(
                    &format!(
                        "/v1/things/{}/certificates/{}?exclusive={exclusive}",
                        segment(&name),
                        segment(&certificate)
                    ),
                    None,
                )
                .await?;
            out.show(&v, thing_text);
        }
        ThingCommand::Detach { name, certificate } => {
            let v = client
                .delete(&format!(
                    "/v1/things/{}/certificates/{}",
                    segment(&name),
                    segment(&certificate)
                ))
                .await?;
            out.show(&v, thing_text);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn version_text(v: &Value) -> String {
    let mut text = format!(
        "{} version {}  ({} CRL(s), stored {})",
        s(&v["name"]),
        s(&v["version"]),
        v["crls"].as_array().map_or(0, Vec::len),
        when(&v["created_at"])
    );
    for c in v["certificates"].as_array().into_iter().flatten() {
        text.push_str(&format!(
            "\n  #{} {}  {}  expires {}  {}{}",
            s(&c["index"]),
            s(&c["role"]),
            s(&c["subject"]),
            s(&c["not_after"]),
            s(&c["id"]),
            if c["duplicate"] == true {
                "  (duplicate)"
            } else {
                ""
            }
        ));
    }
    for w in v["warnings"].as_array().into_iter().flatten() {
        text.push_str(&format!("\n  warning: {}", s(w)));
    }
    for (domain, warnings) in v["domain_warnings"].as_object().into_iter().flatten() {
        for w in warnings.as_array().into_iter().flatten() {
            text.push_str(&format!("\n  warning for domain {domain}: {}", s(w)));
        }
    }
    text
}

async fn sessions(
    client: &AdminClient,
    out: &Printer,
    command: SessionsCommand,
) -> Result<ExitCode> {
    match command {
        SessionsCommand::List => {
            let v = client.get("/v1/sessions").await?;
            out.show(&v, |v| {
                let lines: Vec<String> = items(v)
                    .map(|x| {
                        let subs: Vec<String> = x["subscriptions"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(s)
                            .collect();
                        format!(
                            "{}  {}  {}  subscriptions [{}]  queued {}",
                            s(&x["client_id"]),
                            if x["online"] == true {
                                "online"
                            } else {
                                "offline"
                            },
                            s(&x["identity"]),
                            subs.join(" "),
                            s(&x["queued"])
                        )
                    })
                    .collect();
                if lines.is_empty() {
                    "no MQTT sessions".into()
                } else {
                    lines.join("\n")
                }
            });
        }
        SessionsCommand::Disconnect { client_id, forget } => {
            client
                .delete(&format!(
                    "/v1/sessions/{}?forget={forget}",
                    segment(&client_id)
                ))
                .await?;
            out.show(&json!({"disconnected": client_id}), |_| {
                format!("disconnected {client_id}")
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A webhook as one line.
fn webhook_line(w: &Value) -> String {
    let events: Vec<String> = w["events"]
        .as_array()
        .into_iter()
        .flatten()
        .map(s)
        .collect();
    format!(
        "{}  {}  {}  {}  events {}{}{}",
        s(&w["id"]),
        s(&w["name"]),
        if w["enabled"] == true {
            "enabled"
        } else {
            "disabled"
        },
        s(&w["url"]),
        events.join(","),
        if w["custom_ca"] == true {
            "  (own CA bundle)"
        } else {
            ""
        },
        w["topic_filter"]
            .as_str()
            .map(|f| format!("  topic filter {f}"))
            .unwrap_or_default()
    )
}

/// A delivery as one line.
fn delivery_line(d: &Value) -> String {
    let error = d["last_error"]
        .as_str()
        .map(|e| format!("  last error: {e}"))
        .unwrap_or_default();
    format!(
        "{}  {}  {}  attempts {}  created {}{}{}",
        s(&d["id"]),
        s(&d["event_type"]),
        s(&d["status"]),
        s(&d["attempts"]),
        when(&d["created_at"]),
        d["replay_of"]
            .as_str()
            .map(|r| format!("  replay of {r}"))
            .unwrap_or_default(),
        error
    )
}

async fn webhook(client: &AdminClient, out: &Printer, command: WebhookCommand) -> Result<ExitCode> {
    let path = |id: &str| format!("/v1/webhooks/{}", segment(id));
    let ca_text = |p: &Path| -> Result<String> {
        String::from_utf8(read(p, "CA bundle")?)
            .with_context(|| format!("{}: a CA bundle is PEM text", p.display()))
    };
    match command {
        WebhookCommand::Create {
            name,
            url,
            events,
            expiring_days,
            ca,
            topic_filter,
        } => {
            let ca_pem = match &ca {
                Some(p) => ca_text(p)?,
                None => String::new(),
            };
            let v = client
                .post(
                    "/v1/webhooks",
                    &json!({"name": name, "url": url, "events": events, "expiring_days": expiring_days, "ca_pem": ca_pem, "topic_filter": topic_filter}),
                )
                .await?;
            out.show(&v, |v| {
                format!(
                    "{}\nsigning secret (shown once; receivers check X-Portcullis-Signature with it):\n{}",
                    webhook_line(v),
                    s(&v["secret"])
                )
            });
        }
        WebhookCommand::List => {
            let v = client.get("/v1/webhooks").await?;
            out.show(&v, |v| {
                items(v).map(webhook_line).collect::<Vec<_>>().join("\n")
            });
        }
        WebhookCommand::Describe { id } => {
            let v = client.get(&path(&id)).await?;
            out.show(&v, webhook_line);
        }
        WebhookCommand::Update {
            id,
            url,
            events,
            enabled,
            expiring_days,
            ca,
            system_roots,
        } => {
            let mut body = json!({});
            if let Some(u) = url {
                body["url"] = json!(u);
            }
            if !events.is_empty() {
                body["events"] = json!(events);
            }
            match enabled.as_deref() {
                None => {}
                Some("on") => body["enabled"] = json!(true),
                Some("off") => body["enabled"] = json!(false),
                Some(other) => bail!("--enabled {other}: say on or off"),
            }
            if let Some(d) = expiring_days {
                body["expiring_days"] = json!(d);
            }
            if let Some(p) = &ca {
                body["ca_pem"] = json!(ca_text(p)?);
            } else if system_roots {
                body["ca_pem"] = json!("");
            }
            let v = client.patch(&path(&id), &body).await?;
            out.show(&v, webhook_line);
        }
        WebhookCommand::Delete { id } => {
            client.delete(&path(&id)).await?;
            out.show(&json!({"deleted": id}), |_| format!("deleted webhook {id}"));
        }
        WebhookCommand::Deliveries { id, status, limit } => {
            let mut query = format!("?limit={limit}");
            if let Some(s) = &status {
                query.push_str(&format!("&status={}", segment(s)));
            }
            let v = client
                .get(&format!("{}/deliveries{query}", path(&id)))
                .await?;
            out.show(&v, |v| {
                items(v).map(delivery_line).collect::<Vec<_>>().join("\n")
            });
        }
        WebhookCommand::Replay { delivery } => {
            let v = client
                .post(
                    &format!("/v1/deliveries/{}/replay", segment(&delivery)),
                    &json!({}),
                )
                .await?;
            out.show(&v, |v| format!("queued {}", delivery_line(v)));
        }
        WebhookCommand::CheckExpiry => {
            let v = client.post("/v1/expiry-check", &json!({})).await?;
            out.show(&v, |v| {
                format!(
                    "{} delivery(ies) queued for expiring certificates and CAs",
                    s(&v["deliveries"])
                )
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A policy document file (JSON), sent as written: the registry refuses duplicate keys, which
/// parsing it here would silently collapse.
fn policy_document(path: &Path) -> Result<Box<serde_json::value::RawValue>> {
    let text = String::from_utf8(read(path, "policy document")?)
        .with_context(|| format!("{}: a policy document is JSON text", path.display()))?;
    serde_json::value::RawValue::from_string(text.trim().to_string())
        .map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// A policy as text: versions, targets, the document.
fn policy_text(v: &Value) -> String {
    let versions: Vec<String> = v["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            let star = if x["is_default"] == true { "*" } else { "" };
            format!("{}{star}", s(&x["version"]))
        })
        .collect();
    let targets: Vec<String> = v["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| format!("{} {}", s(&t["type"]), s(&t["target"])))
        .collect();
    format!(
        "{}  default version {}  versions {}  (* = default)\nattached to: {}\nversion {}:\n{}",
        s(&v["name"]),
        s(&v["default_version"]),
        versions.join(" "),
        if targets.is_empty() {
            "nothing".to_string()
        } else {
            targets.join(", ")
        },
        s(&v["version"]),
        serde_json::to_string_pretty(&v["document"]).unwrap_or_default()
    )
}

async fn policy(client: &AdminClient, out: &Printer, command: PolicyCommand) -> Result<ExitCode> {
    let path = |name: &str| format!("/v1/policies/{}", segment(name));
    match command {
        PolicyCommand::Create { name, document } => {
            let body = format!(
                r#"{{"name":{},"document":{}}}"#,
                serde_json::to_string(&name)?,
                policy_document(&document)?.get()
            );
            let v = client.post_text("/v1/policies", body).await?;
            out.show(&v, |v| {
                format!("created policy {} version 1", s(&v["name"]))
            });
        }
        PolicyCommand::CreateVersion {
            name,
            document,
            set_default,
        } => {
            let body = format!(
                r#"{{"document":{},"set_default":{set_default}}}"#,
                policy_document(&document)?.get()
            );
            let v = client
                .post_text(&format!("{}/versions", path(&name)), body)
                .await?;
            out.show(&v, |v| {
                let newest = v["versions"]
                    .as_array()
                    .and_then(|a| a.last())
                    .map(|x| s(&x["version"]))
                    .unwrap_or_default();
                format!(
                    "policy {}: added version {newest}; default version {}",
                    s(&v["name"]),
                    s(&v["default_version"])
                )
            });
        }
        PolicyCommand::SetDefault { name, version } => {
            let v = client
                .patch(&path(&name), &json!({"default_version": version}))
                .await?;
            out.show(&v, |v| {
                format!(
                    "policy {}: default version {}",
                    s(&v["name"]),
                    s(&v["default_version"])
                )
            });
        }
        PolicyCommand::DeleteVersion { name, version } => {
            let v = client
                .delete(&format!("{}/versions/{version}", path(&name)))
                .await?;
            out.show(&v, |v| {
                format!("policy {}: deleted version {version}", s(&v["name"]))
            });
        }
        PolicyCommand::Get { name, version } => {
            let query = version.map_or(String::new(), |v| format!("?version={v}"));
            let v = client.get(&format!("{}{query}", path(&name))).await?;
            out.show(&v, policy_text);
        }
        PolicyCommand::List => {
            let v = client.get("/v1/policies").await?;
            out.show(&v, |v| {
                items(v)
                    .map(|p| {
                        format!(
                            "{}  default version {}  {} attachment(s)  updated {}",
                            s(&p["name"]),
                            s(&p["default_version"]),
                            s(&p["attachments"]),
                            when(&p["updated_at"])
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        PolicyCommand::Attach(t) => {
            let v = client.put(&t.path(), None).await?;
            out.show(&v, policy_text);
        }
        PolicyCommand::Detach(t) => {
            let v = client.delete(&t.path()).await?;
            out.show(&v, policy_text);
        }
        PolicyCommand::Delete { name } => {
            client.delete(&path(&name)).await?;
            out.show(&json!({"deleted": name}), |_| {
                format!("deleted policy {name}")
            });
        }
        PolicyCommand::Simulate(a) => {
            let pem = String::from_utf8(read(&a.cert, "certificate")?).or_else(|_| {
                let certs = portcullis_pki::Certificate::all_from_pem_or_der(&read(
                    &a.cert,
                    "certificate",
                )?)
                .with_context(|| format!("reading {}", a.cert.display()))?;
                Ok::<String, anyhow::Error>(certs.iter().map(|c| c.to_pem()).collect())
            })?;
            let mut body =
                json!({"certificate_pem": pem, "action": a.action, "resource": a.resource});
            if let Some(ip) = &a.source_ip {
                body["source_ip"] = json!(ip);
            }
            if let Some(id) = &a.client_id {
                body["client_id"] = json!(id);
            }
            if !a.policies.is_empty() {
                body["policies"] = json!(a.policies);
            }
            if let Some(d) = &a.domain {
                body["domain"] = json!(d);
            }
            let v = client.post("/v1/simulate", &body).await?;
            out.show(&v, simulation_text);
            if v["decision"] != "allow" {
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A simulation as text: decision, statement, policies, variables, per-statement trace.
fn simulation_text(v: &Value) -> String {
    let mut text = format!(
        "decision:    {}\nreason:      {}\nrequest:     {} on {}\n",
        s(&v["decision"]).to_uppercase(),
        s(&v["reason"]),
        s(&v["action"]),
        s(&v["resource"])
    );
    let policies: Vec<String> = v["policies"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            format!(
                "{} v{} ({})",
                s(&p["name"]),
                s(&p["version"]),
                s(&p["attached_to"])
            )
        })
        .collect();
    text.push_str(&format!(
        "policies:    {}\nvariables:\n",
        if policies.is_empty() {
            "none".to_string()
        } else {
            policies.join(", ")
        }
    ));
    if let Some(vars) = v["variables"].as_object() {
        for (name, values) in vars {
            let values: Vec<String> = values.as_array().into_iter().flatten().map(s).collect();
            text.push_str(&format!("  ${{{name}}} = {}\n", values.join(" | ")));
        }
    }
    if let Some(trace) = v["trace"].as_array() {
        text.push_str("statements:\n");
        for t in trace {
            text.push_str(&format!("  {}\n", trace_line(t)));
        }
    }
    text.trim_end().to_string()
}

/// One statement of a trace: `partner v2 #1 (no-deletes) Deny: applies` or why it does not.
fn trace_line(t: &Value) -> String {
    let st = &t["statement"];
    let sid = st["sid"]
        .as_str()
        .map(|s| format!(" ({s})"))
        .unwrap_or_default();
    let outcome = if t["applied"] == true {
        "applies".to_string()
    } else {
        let f = &t["failed"];
        let mut why = format!("does not apply: {}", s(&f["part"]));
        for key in ["operator", "key", "detail"] {
            if let Some(v) = f[key].as_str() {
                why.push_str(&format!(" {v}"));
            }
        }
        why
    };
    format!(
        "{} v{} #{}{sid} {}: {outcome}",
        s(&st["policy"]),
        s(&st["version"]),
        s(&st["index"]),
        s(&st["effect"])
    )
}

/// A domain file: one `[[domain]]` (or `[domain]`) table, bare `[[domain]]` keys, or JSON.
fn domain_spec(path: &Path) -> Result<Value> {
    let text = String::from_utf8(read(path, "domain")?)
        .with_context(|| format!("{}: a domain file is TOML or JSON text", path.display()))?;
    let value: Value = if text.trim_start().starts_with('{') {
        serde_json::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?
    } else {
        let table: toml::Table = toml::from_str(&text).map_err(|e| {
            anyhow!(
                "{}: {}",
                path.display(),
                e.message().lines().next().unwrap_or_default()
            )
        })?;
        serde_json::to_value(table)?
    };
    let spec = match value.get("domain") {
        Some(Value::Array(tables)) if tables.len() == 1 => tables[0].clone(),
        Some(Value::Object(_)) => value["domain"].clone(),
        Some(_) => bail!(
            "{}: the file must hold exactly one [[domain]] table",
            path.display()
        ),
        None => value,
    };
    if !spec["hostname"].is_string() {
        bail!("{}: the domain needs hostname = \"…\"", path.display());
    }
    Ok(spec)
}

/// A domain as the configuration file's `[[domain]]` table.
fn domain_toml(record: &Value) -> String {
    let table = json!({"domain": [record["spec"].clone()]});
    let body = toml::to_string(&table).unwrap_or_else(|e| format!("# cannot show as TOML: {e}\n"));
    format!(
        "# version {}, updated {}\n{body}",
        s(&record["version"]),
        when(&record["updated_at"])
    )
}

async fn domain(client: &AdminClient, out: &Printer, command: DomainCommand) -> Result<ExitCode> {
    match command {
        DomainCommand::List => {
            let v = client.get("/v1/domains").await?;
            out.show(&v, |v| {
                items(v)
                    .map(|d| {
                        let spec = &d["spec"];
                        format!(
                            "{}  v{}  mtls {}  registry {}  {} mapping(s)  updated {}",
                            s(&d["hostname"]),
                            s(&d["version"]),
                            spec["mtls"]["mode"].as_str().unwrap_or("off"),
                            s(&spec["registry_mode"]),
                            spec["mapping"].as_array().map_or(0, Vec::len),
                            when(&d["updated_at"])
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        DomainCommand::Describe { hostname } => {
            let v = client
                .get(&format!("/v1/domains/{}", segment(&hostname)))
                .await?;
            out.show(&v, domain_toml);
        }
        DomainCommand::Put { file, if_version } => {
            let spec = domain_spec(&file)?;
            let hostname = s(&spec["hostname"]);
            let v = client
                .put(
                    &format!("/v1/domains/{}", segment(&hostname)),
                    Some(&json!({"spec": spec, "expected_version": if_version})),
                )
                .await?;
            out.show(&v, |v| {
                let mut text = format!(
                    "{} is at version {}; the gateway applies it within a second",
                    s(&v["hostname"]),
                    s(&v["version"])
                );
                for w in v["warnings"].as_array().into_iter().flatten() {
                    text.push_str(&format!("\n  warning: {}", s(w)));
                }
                text
            });
        }
        DomainCommand::Delete {
            hostname,
            if_version,
        } => {
            let query = if_version.map_or(String::new(), |v| format!("?expected_version={v}"));
            client
                .delete(&format!("/v1/domains/{}{query}", segment(&hostname)))
                .await?;
            out.show(&json!({"deleted": hostname}), |_| {
                format!("deleted {hostname}")
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn enroll(client: &AdminClient, out: &Printer, a: EnrollArgs) -> Result<ExitCode> {
    use base64::Engine;
    let (password, generated) = match &a.password_file {
        Some(path) => {
            let text = String::from_utf8(read(path, "password file")?)
                .with_context(|| format!("{}: the password file is not text", path.display()))?;
            let line = text.lines().next().unwrap_or_default().to_string();
            (line, false)
        }
        None => {
            let serial = portcullis_pki::issue::random_serial()?;
            (portcullis_pki::cert::hex(&serial[..10], ""), true)
        }
    };
    if password.chars().count() < 8 {
        bail!(
            "the password must be at least 8 characters: it protects the private key in the bundles"
        );
    }
    let mut body = json!({
        "common_name": a.cn,
        "password": password,
        "embed_password": a.embed_password,
        "allow_separators": a.allow_separators,
    });
    if let Some(days) = a.days {
        body["days"] = json!(days);
    }
    // Files that exist (without --force) and an output directory that cannot be made stop the
    // command before anything is issued.
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("creating the output directory {}", a.out.display()))?;
    let names = |stem: &str| {
        [
            a.out.join(format!("{stem}.p12")),
            a.out.join(format!("{stem}-legacy.p12")),
            a.out.join(format!("{stem}.mobileconfig")),
        ]
    };
    if !a.force
        && let Some(existing) = names(&portcullis_admin::enroll::file_stem(a.cn.trim()))
            .iter()
            .find(|p| p.exists())
    {
        bail!(
            "{} already exists; choose another --out or pass --force to overwrite it",
            existing.display()
        );
    }
    let v = client.post("/v1/enrollments", &body).await?;
    let mut files = portcullis_node::output::Outputs::default();
    for key in ["p12", "p12_legacy", "mobileconfig"] {
        let file = &v["files"][key];
        let name = file["name"].as_str().unwrap_or_default();
        let expected = names(&portcullis_admin::enroll::file_stem(a.cn.trim()));
        if !expected
            .iter()
            .any(|p| p.file_name().is_some_and(|f| f == name))
        {
            bail!("the admin API answered with an unexpected file name '{name}'");
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(file["base64"].as_str().unwrap_or_default())
            .context("the admin API answered with a file that is not base64")?;
        // Every file holds the private key.
        files.secret(a.out.join(name), bytes);
    }
    let written = files.write(a.force)?;
    let mut shown = json!({
        "certificate": v["certificate"],
        "files": written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "password_embedded": a.embed_password,
    });
    if generated {
        shown["password"] = json!(password);
    }
    out.show(&shown, |shown| {
        let mut text = format!(
            "enrolled {} (certificate {}, ACTIVE)",
            a.cn,
            s(&shown["certificate"]["id"])
        );
        for f in shown["files"].as_array().into_iter().flatten() {
            text.push_str(&format!("\n  wrote {}", s(f)));
        }
        if generated {
            text.push_str(&format!(
                "\n  password: {password} (give it to the device's user or MDM separately; it is written nowhere)"
            ));
        }
        if !a.embed_password {
            text.push_str(
                "\n  the .mobileconfig asks for the password when installed (--embed-password writes it in, for a silent MDM install)",
            );
        }
        text
    });
    Ok(ExitCode::SUCCESS)
}

async fn server_cert(
    client: &AdminClient,
    out: &Printer,
    command: ServerCertCommand,
) -> Result<ExitCode> {
    let line = |c: &Value| {
        format!(
            "{}  {}  not after {}  version {}",
            s(&c["name"]),
            s(&c["subject"]),
            time::OffsetDateTime::from_unix_timestamp(c["not_after"].as_i64().unwrap_or_default())
                .map(|t| t.date().to_string())
                .unwrap_or_default(),
            s(&c["version"])
        )
    };
    match command {
        ServerCertCommand::Import { name, cert, key } => {
            let chain = portcullis_pki::Certificate::all_from_pem_or_der(&read(
                &cert,
                "certificate chain",
            )?)
            .with_context(|| format!("reading certificate chain {}", cert.display()))?;
            if chain.is_empty() {
                bail!("{} holds no certificate", cert.display());
            }
            let private = portcullis_pki::PrivateKey::from_pem_or_der(&read(&key, "private key")?)
                .with_context(|| format!("reading private key {}", key.display()))?;
            let pem: String = chain
                .iter()
                .map(portcullis_pki::Certificate::to_pem)
                .collect();
            let body = json!({"certificate_pem": pem, "key_pem": private.to_pem()});
            let v = client
                .put(
                    &format!("/v1/server-certificates/{}", segment(&name)),
                    Some(&body),
                )
                .await?;
            out.show(&v, |v| {
                format!(
                    "imported {} (use it with certificate = \"registry:{}\")",
                    line(v),
                    s(&v["name"])
                )
            });
        }
        ServerCertCommand::List => {
            let v = client.get("/v1/server-certificates").await?;
            out.show(&v, |v| items(v).map(line).collect::<Vec<_>>().join("\n"));
        }
        ServerCertCommand::Describe { name } => {
            let v = client
                .get(&format!("/v1/server-certificates/{}", segment(&name)))
                .await?;
            out.show(&v, |v| {
                let domains: Vec<String> = v["domains"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(s)
                    .collect();
                format!(
                    "{}\nserved by: {}",
                    line(v),
                    if domains.is_empty() {
                        "no domain".to_string()
                    } else {
                        domains.join(", ")
                    }
                )
            });
        }
        ServerCertCommand::Delete { name } => {
            client
                .delete(&format!("/v1/server-certificates/{}", segment(&name)))
                .await?;
            out.show(&json!({"deleted": name}), |_| {
                format!("deleted server certificate {name}")
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn truststore(
    client: &AdminClient,
    out: &Printer,
    command: TruststoreCommand,
) -> Result<ExitCode> {
    // Bundles and CRLs in PEM, DER or PKCS#7 are sent as PEM.
    let bundle_pem = |path: &std::path::Path| -> Result<String> {
        let certs =
            portcullis_pki::Certificate::all_from_pem_or_der(&read(path, "truststore bundle")?)
                .with_context(|| format!("reading bundle {}", path.display()))?;
        if certs.is_empty() {
            bail!(
                "{} holds no certificate (PEM, DER or PKCS#7 expected)",
                path.display()
            );
        }
        Ok(certs
            .iter()
            .map(portcullis_pki::Certificate::to_pem)
            .collect())
    };
    let crls_pem = |paths: &[PathBuf]| -> Result<Vec<String>> {
        paths
            .iter()
            .map(|p| -> Result<String> {
                let bytes = read(p, "CRL")?;
                let crls = portcullis_pki::crl::Crl::all_from_pem_or_der(&bytes)
                    .with_context(|| format!("reading CRL {}", p.display()))?;
                Ok(crls.iter().map(portcullis_pki::crl::Crl::to_pem).collect())
            })
            .collect()
    };
    let body = |a: &TruststoreArgs| -> Result<Value> {
        Ok(
            json!({"name": a.name, "bundle_pem": bundle_pem(&a.bundle)?, "crls_pem": crls_pem(&a.crls)?}),
        )
    };
    match command {
        TruststoreCommand::Create(a) => {
            let v = client.post("/v1/truststores", &body(&a)?).await?;
            out.show(&v, |v| format!("created {}", version_text(v)));
        }
        TruststoreCommand::AddVersion(a) => {
            let mut b = body(&a)?;
            if let Some(o) = b.as_object_mut() {
                o.remove("name");
            }
            let v = client
                .post(
                    &format!("/v1/truststores/{}/versions", segment(&a.name)),
                    &b,
                )
                .await?;
            out.show(&v, |v| format!("added {}", version_text(v)));
        }
        TruststoreCommand::List => {
            let v = client.get("/v1/truststores").await?;
            out.show(&v, |v| {
                items(v)
                    .map(|t| {
                        format!(
                            "{}  latest version {}",
                            s(&t["name"]),
                            s(&t["latest_version"])
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        TruststoreCommand::Describe { name, version } => {
            let path = match version {
                Some(v) => format!("/v1/truststores/{}/versions/{v}", segment(&name)),
                None => format!("/v1/truststores/{}", segment(&name)),
            };
            let v = client.get(&path).await?;
            out.show(&v, version_text);
        }
        TruststoreCommand::Delete { name } => {
            client
                .delete(&format!("/v1/truststores/{}", segment(&name)))
                .await?;
            out.show(&json!({"deleted": name}), |_| {
                format!("deleted truststore {name}")
            });
        }
        TruststoreCommand::Preview {
            name,
            version,
            bundle,
            crls,
            days,
        } => {
            let v = match (version, bundle) {
                (_, Some(bundle)) => {
                    client
                        .post(
                            &format!("/v1/truststores/{}/preview", segment(&name)),
                            &json!({"bundle_pem": bundle_pem(&bundle)?, "crls_pem": crls_pem(&crls)?, "days": days}),
                        )
                        .await?
                }
                (version, None) => {
                    let version = version.unwrap_or(1);
                    client
                        .get(&format!(
                            "/v1/truststores/{}/versions/{version}/preview?days={days}",
                            segment(&name)
                        ))
                        .await?
                }
            };
            out.show(&v, |v| {
                let domains: Vec<String> = v["domains"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(s)
                    .collect();
                let mut text = format!(
                    "{} {}: of {} certificate(s) seen in the last {} days on {}, {} would be rejected",
                    s(&v["truststore"]),
                    if v["version"] == "bundle" { "bundle".to_string() } else { format!("version {}", s(&v["version"])) },
                    s(&v["checked"]),
                    s(&v["days"]),
                    if domains.is_empty() { "no domain (none uses this truststore)".to_string() } else { domains.join(", ") },
                    s(&v["would_reject"])
                );
                for r in v["rejected"].as_array().into_iter().flatten() {
                    text.push_str(&format!(
                        "\n  {}  {}  on {}  last seen {}: {} ({})",
                        s(&r["certificate_id"]), s(&r["subject"]), s(&r["domain"]), when(&r["last_seen"]),
                        s(&r["reason"]), s(&r["explanation"])
                    ));
                }
                for w in v["warnings"].as_array().into_iter().flatten() {
                    text.push_str(&format!("\n  warning: {}", s(w)));
                }
                text
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn audit(client: &AdminClient, out: &Printer, command: AuditCommand) -> Result<ExitCode> {
    let AuditCommand::List {
        action,
        target,
        limit,
    } = command;
    let mut q = format!("/v1/audit?limit={limit}");
    if let Some(a) = action {
        q.push_str(&format!("&action={}", segment(&a)));
    }
    if let Some(t) = target {
        q.push_str(&format!("&target={}", segment(&t)));
    }
    let v = client.get(&q).await?;
    out.show(&v, |v| {
        items(v)
            .map(|e| {
                format!(
                    "#{} {} {} {} {}{}",
                    s(&e["seq"]),
                    when(&e["at"]),
                    s(&e["actor"]),
                    s(&e["action"]),
                    s(&e["target"]),
                    match (&e["before"], &e["after"]) {
                        (Value::Null, Value::Null) => String::new(),
                        (b, a) => format!("\n    before: {}\n    after:  {}", s(b), s(a)),
                    }
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(ExitCode::SUCCESS)
}

async fn token(client: &AdminClient, out: &Printer, command: TokenCommand) -> Result<ExitCode> {
    match command {
        TokenCommand::Create { name } => {
            let v = client.post("/v1/tokens", &json!({"name": name})).await?;
            out.show(&v, |v| {
                format!(
                    "token {} ({}); shown once, keep it secret:\n{}",
                    s(&v["id"]),
                    s(&v["name"]),
                    s(&v["token"])
                )
            });
        }
        TokenCommand::List => {
            let v = client.get("/v1/tokens").await?;
            out.show(&v, |v| {
                items(v)
                    .map(|t| {
                        format!(
                            "{}  {}  created {}  last used {}",
                            s(&t["id"]),
                            s(&t["name"]),
                            when(&t["created_at"]),
                            when(&t["last_used"])
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        TokenCommand::Delete { id } => {
            client
                .delete(&format!("/v1/tokens/{}", segment(&id)))
                .await?;
            out.show(&json!({"deleted": id}), |_| format!("deleted token {id}"));
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn admin_cert(
    client: &AdminClient,
    out: &Printer,
    command: AdminCertCommand,
) -> Result<ExitCode> {
    match command {
        AdminCertCommand::Rotate { out: dir, force } => {
            let v = client
                .post("/v1/admin/certificates/rotate", &json!({}))
                .await?;
            if let Some(dir) = dir {
                use base64::Engine;
                let p12 = base64::engine::general_purpose::STANDARD
                    .decode(s(&v["p12_base64"]))
                    .context("the API's .p12 is not base64")?;
                let mut files = Outputs::default();
                files.public(dir.join("admin.pem"), s(&v["chain_pem"]));
                files.secret(dir.join("admin.key"), s(&v["private_key_pem"]));
                files.secret(dir.join("admin.p12"), p12);
                files.secret(
                    dir.join("admin.p12.password"),
                    format!("{}\n", s(&v["p12_password"])),
                );
                files.write(force)?;
            }
            let mut shown = v.clone();
            if let Some(o) = shown.as_object_mut() {
                for secret in ["private_key_pem", "p12_base64", "p12_password"] {
                    o.remove(secret);
                }
            }
            out.show(&shown, |v| {
                format!(
                    "new admin certificate {} (in the node's data dir{}); revoked {}",
                    s(&v["id"]),
                    if v["revoked"].is_null() {
                        ""
                    } else {
                        ", the old one refused from now on"
                    },
                    s(&v["revoked"])
                )
            });
        }
        AdminCertCommand::List => {
            let v = client.get("/v1/admin/certificates").await?;
            out.show(&v, |v| {
                let mut lines = vec![format!("current: {}", s(&v["current"]))];
                lines.extend(items(v).map(|c| {
                    format!(
                        "{}  {}  {}  until {}",
                        s(&c["id"]),
                        s(&c["status"]),
                        s(&c["subject"]),
                        when(&c["not_after"])
                    )
                }));
                lines.join("\n")
            });
        }
        AdminCertCommand::Revoke { id } => {
            client
                .post(
                    &format!("/v1/admin/certificates/{}/revoke", segment(&id)),
                    &json!({}),
                )
                .await?;
            out.show(&json!({"revoked": id}), |_| {
                format!("revoked admin certificate {id}")
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the decision trace; exit 0 when the request would be allowed, 1 when denied.
async fn explain(client: &AdminClient, out: &Printer, a: ExplainArgs) -> Result<ExitCode> {
    let body = json!({
        "domain": a.domain,
        "host": a.host,
        "source_ip": a.source_ip,
        "method": a.method,
        "path": a.path,
        "certificate_pem": pem_text(&a.cert, "certificate")?,
        "profile": a.profile,
    });
    let v = client.post("/v1/explain", &body).await?;
    out.show(&v, |v| {
        let mut text = format!(
            "domain:      {} (matched by {}; mtls {}, failures answered by {})\n",
            s(&v["domain"]["hostname"]),
            s(&v["domain"]["matched_by"]),
            s(&v["domain"]["mtls_mode"]),
            s(&v["domain"]["on_failure"])
        );
        text.push_str(&format!(
            "certificate: {}  {}\n",
            s(&v["certificate"]["subject"]),
            s(&v["certificate"]["id"])
        ));
        match v["chain"]["result"].as_str() {
            Some("valid") => text.push_str(&format!(
                "chain:       valid: {}\n",
                v["chain"]["path"]
                    .as_array()
                    .map(|p| p.iter().map(s).collect::<Vec<_>>().join(" <- "))
                    .unwrap_or_default()
            )),
            _ => text.push_str(&format!(
                "chain:       REJECTED {}: {}\n",
                s(&v["chain"]["reason"]),
                s(&v["chain"]["explanation"])
            )),
        }
        let r = &v["registry"];
        text.push_str(&format!(
            "registry:    mode {}, status {}, {}{}\n",
            s(&r["mode"]),
            s(&r["status"]),
            s(&r["decision"]),
            r["explanation"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ));
        match &v["mapping"] {
            Value::Null => text.push_str("mapping:     none matches\n"),
            m => text.push_str(&format!(
                "mapping:     '{}' -> {} (path {}){}\n",
                s(&m["base_path"]),
                s(&m["upstream"]),
                s(&m["upstream_path"]),
                if m["requires_client_certificate"] == true {
                    ", needs a valid client certificate"
                } else {
                    ""
                }
            )),
        }
        if let Some(p) = v["policy"].as_object() {
            let policies: Vec<String> = p["policies"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| {
                    format!(
                        "{} v{} ({})",
                        s(&x["name"]),
                        s(&x["version"]),
                        s(&x["attached_to"])
                    )
                })
                .collect();
            text.push_str(&format!(
                "policy:      {} {} on {}: {}\n             policies: {}\n",
                s(&p["decision"]).to_ascii_uppercase(),
                s(&p["action"]),
                s(&p["resource"]),
                s(&p["reason"]),
                if policies.is_empty() {
                    "none".to_string()
                } else {
                    policies.join(", ")
                }
            ));
            for t in p["trace"].as_array().into_iter().flatten() {
                text.push_str(&format!("             {}\n", trace_line(t)));
            }
        }
        text.push_str(&format!(
            "decision:    {}: {}",
            s(&v["decision"]).to_ascii_uppercase(),
            s(&v["summary"])
        ));
        text
    });
    Ok(if v["decision"] == "allow" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
