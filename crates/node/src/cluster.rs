//! A node of a cluster: what it shares with the other nodes through the registry, under the
//! cluster key, so that a node joins with its configuration file alone.
//!
//! - The local CA (it issues `auto` certificates and the admin listener's certificate) is the
//!   cluster's: the registry's, or — when there is none yet — this data dir's, recorded as the
//!   cluster's (the first node wins). Its certificate is written to `DATA_DIR/ca/cluster-ca.pem`,
//!   the same file on every node, for clients to trust (and to `DATA_DIR/ca/ca.pem` when the
//!   data dir has no CA of its own).
//! - `auto` certificates are kept in the registry as server certificates named `auto:HOST`,
//!   issued once for the whole cluster by whichever node needs one first, and renewed 30 days
//!   before they expire.
//!
//! - The admin CA is the cluster's too: the admin listener of every node verifies admin client
//!   certificates against it, and each data dir's admin client certificate is issued by it.
//!
//! Invariant: keys travel only sealed; nothing here writes a CA's private key to disk.

use std::sync::Arc;

use anyhow::{Context, Result};
use portcullis_gateway::config::Hostname;
use portcullis_pki::issue::CaIssuer;
use portcullis_pki::{Certificate, PrivateKey};
use portcullis_registry::sealed::ClusterKey;
use portcullis_registry::{DomainSpec, RegistryError, ServerCertRecord, Store};

use crate::data_dir::{DataDir, auto_due, issue_auto, new_root_issuer};
use crate::output::Outputs;

/// What this node shares with the cluster.
#[derive(Debug, Clone)]
pub(crate) struct Cluster {
    /// Seals and opens the keys kept in the registry.
    pub(crate) key: Arc<ClusterKey>,
    /// The cluster's local CA.
    pub(crate) ca: Arc<CaIssuer>,
    /// The cluster's admin CA: admin client certificates issued by any node work on all.
    pub(crate) admin_ca: Arc<CaIssuer>,
}

/// The shared CAs' names in the registry.
const LOCAL_CA: &str = "local";
const ADMIN_CA: &str = "admin";

/// The cluster's CA `name`: the registry's, or `own()` recorded as the cluster's when there is
/// none yet (the first node wins); with its certificate PEM.
async fn shared_ca(
    store: &Store,
    key: &ClusterKey,
    name: &str,
    own: impl FnOnce() -> Result<CaIssuer>,
) -> Result<(CaIssuer, String)> {
    let context = format!("cluster-ca:{name}");
    let (cert_pem, sealed) = match store.cluster_ca(name).await? {
        Some(recorded) => recorded,
        None => {
            let own = own()?;
            let sealed = key.seal(own.key().pkcs8_der(), &context)?;
            store
                .init_cluster_ca(name, &own.certificate().to_pem(), &sealed)
                .await?
        }
    };
    let (cert, _) = Certificate::first_and_rest(cert_pem.as_bytes())
        .with_context(|| format!("the cluster's {name} CA certificate"))?;
    let der = key.open(&sealed, &context)?;
    let ca_key = PrivateKey::from_pem_or_der(&der)
        .with_context(|| format!("the cluster's {name} CA key"))?;
    let ca = CaIssuer::new(cert, ca_key, Vec::new())
        .with_context(|| format!("the cluster's {name} CA"))?;
    Ok((ca, cert_pem))
}

impl Cluster {
    /// Joins the cluster: the key was checked against the registry's; the local CA is the
    /// registry's, or this data dir's recorded as the cluster's when there is none yet.
    /// `own_admin_ca` gives this data dir's admin CA (or a new one, in memory), recorded when the
    /// cluster has none yet.
    pub(crate) async fn join(
        store: &Store,
        key: Arc<ClusterKey>,
        data: &DataDir,
        own_admin_ca: impl FnOnce() -> Result<CaIssuer>,
    ) -> Result<Cluster> {
        // A data dir with a CA of its own (a single node becoming the first of a cluster) brings
        // it; otherwise the CA is made in memory, and its key only ever exists sealed.
        let (ca, cert_pem) = shared_ca(store, &key, LOCAL_CA, || {
            if data.root.join("ca/ca.pem").exists() {
                data.local_ca().context("the data dir's local CA")
            } else {
                new_root_issuer("Portcullis Local CA")
            }
        })
        .await?;
        let (admin_ca, _) = shared_ca(store, &key, ADMIN_CA, own_admin_ca).await?;
        // Clients trust the cluster's CA where they trust a single node's: DATA_DIR/ca/ca.pem,
        // unless this data dir has a CA of its own (then only cluster-ca.pem, and a warning).
        let mut out = Outputs::default();
        out.public(data.root.join("ca/cluster-ca.pem"), cert_pem.clone());
        let own = data.root.join("ca/ca.pem");
        match std::fs::read_to_string(&own) {
            Err(_) => out.public(&own, cert_pem),
            Ok(existing) if existing == cert_pem => {}
            Ok(_) => tracing::warn!(
                file = %own.display(),
                "this data dir's local CA is not the cluster's: auto certificates are issued by the cluster's CA, so clients must trust DATA_DIR/ca/cluster-ca.pem"
            ),
        }
        out.write(true)?;
        Ok(Cluster {
            key,
            ca: Arc::new(ca),
            admin_ca: Arc::new(admin_ca),
        })
    }

    /// Makes sure every `auto` domain of `domains` has a current certificate in the registry:
    /// issued by the cluster's CA when missing or due for renewal, its key sealed.
    pub(crate) async fn ensure_auto_certificates(
        &self,
        store: &Store,
        domains: &[DomainSpec],
    ) -> Result<()> {
        // An `acme` domain is served with an `auto` certificate until its CA has issued one.
        for d in domains
            .iter()
            .filter(|d| d.certificate == "auto" || d.certificate == "acme")
        {
            // A bad hostname is the configuration builder's to report.
            let Ok(host) = Hostname::parse(&d.hostname) else {
                continue;
            };
            if d.certificate == "acme" {
                match store
                    .server_certificate(&crate::acme::certificate_name(&host))
                    .await
                {
                    Ok(_) => continue,
                    Err(RegistryError::NotFound(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let name = auto_name(&host);
            let due = match store.server_certificate(&name).await {
                Ok(record) => auto_due(record.not_after),
                Err(RegistryError::NotFound(_)) => true,
                Err(e) => return Err(e.into()),
            };
            if !due {
                continue;
            }
            let (cert, key) = issue_auto(&self.ca, &host)?;
            let sealed = self
                .key
                .seal(key.pkcs8_der(), &ServerCertRecord::seal_context(&name))?;
            store
                .put_server_certificate(&name, &cert.to_pem(), &sealed, "node:auto")
                .await
                .with_context(|| format!("recording the auto certificate of {host}"))?;
            tracing::info!(target: "portcullis::registry", domain = %host, "issued the cluster's auto certificate");
        }
        Ok(())
    }
}

/// The registry name of a host's `auto` certificate in a cluster: `auto:HOST` (`_wildcard` for
/// `*`), or `auto:` and the host's SHA-256 when that would exceed a registry name's 128
/// characters.
pub(crate) fn auto_name(host: &Hostname) -> String {
    let name = format!("auto:{}", host.to_string().replace('*', "_wildcard"));
    if name.len() <= 128 {
        return name;
    }
    let digest = portcullis_pki::cert::sha256(host.to_string().as_bytes());
    format!("auto:{}", portcullis_pki::cert::hex(&digest, ""))
}

/// Every hour, and at start: renews the cluster's `auto` certificates that are due (or missing)
/// for the registry's domains. A renewal is a registry change, so every node reloads with it.
/// Several nodes may renew at once: one write wins, the others are refused as conflicts and
/// logged; the next pass finds the certificate current.
pub(crate) async fn renew_auto_certificates(store: Store, cluster: Cluster) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        tick.tick().await;
        let domains = match store.domains_seeded().await {
            Ok(true) => store.list_domains().await.map(|list| {
                list.into_iter()
                    .map(|d| d.spec)
                    .collect::<Vec<DomainSpec>>()
            }),
            Ok(false) => Ok(Vec::new()),
            Err(e) => Err(e),
        };
        let result = match domains {
            Ok(domains) => cluster.ensure_auto_certificates(&store, &domains).await,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = result {
            tracing::warn!(target: "portcullis::registry", error = %format!("{e:#}"), "cannot renew the cluster's auto certificates now; retrying within the hour");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_names_fit_the_registry_whatever_the_hostname() {
        let short = Hostname::parse("*.example.com").unwrap();
        assert_eq!(auto_name(&short), "auto:_wildcard.example.com");
        let label = "a".repeat(60);
        let long = Hostname::parse(&format!("{label}.{label}.{label}.example.com")).unwrap();
        let name = auto_name(&long);
        assert!(name.starts_with("auto:") && name.len() <= 128, "{name}");
        assert_ne!(name, auto_name(&short));
    }
}
