//! Building one rustls `ServerConfig` per domain and state generation.
//!
//! A fresh config per generation also means a fresh session cache: a session resumed after a
//! truststore, CRL or certificate change would restore the old client chain without running the
//! verifier, so sessions never outlive the generation that verified them. Session tickets are
//! off (the default `NeverProducesTickets`), so the server-side cache is the only way to resume.

use std::sync::Arc;

use std::collections::HashMap;
use std::sync::Mutex;

use rustls::crypto::CryptoProvider;
use rustls::server::{ServerSessionMemoryCache, StoresServerSessions};
use rustls::{CipherSuite, ServerConfig, SupportedCipherSuite};

use crate::GatewayError;
use crate::config::{Domain, RegistryMode, SecurityPolicy};
use crate::registry_view::RegistryView;
use crate::verdict::ClientVerdict;
use crate::verify::DomainVerifier;

/// Sessions kept per domain and generation for resumption.
const SESSIONS: usize = 4096;

/// The session cache of a domain that consults the registry: the registry changes without a new
/// generation, so each session remembers its client certificate and is not resumed once the
/// registry stops admitting it. The client then makes a full handshake, whose verifier refuses
/// the certificate with the proper alert (`certificate_revoked`…), as `on_failure = "tls"` says.
#[derive(Debug)]
struct AdmittedSessions {
    inner: Arc<ServerSessionMemoryCache>,
    /// Session key → the certificate id (hex) it was verified with.
    leaf_of: Mutex<HashMap<Vec<u8>, String>>,
    verifier: Arc<DomainVerifier>,
}

impl AdmittedSessions {
    /// Whether the session under `key` may resume: its certificate is known and admitted.
    /// Unknown keys fail closed (a full handshake).
    fn admits(&self, key: &[u8]) -> bool {
        let leaf = self.leaf_of.lock().ok().and_then(|m| m.get(key).cloned());
        match leaf {
            Some(id) => self.verifier.admits_resumption(&id),
            None => false,
        }
    }
}

impl StoresServerSessions for AdmittedSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        // Called inside the handshake that verified the certificate, whose verdict is in the
        // connection's task-local slot.
        let leaf = crate::verify::CONNECTION_VERDICT
            .try_with(|slot| {
                slot.lock()
                    .ok()
                    .and_then(|r| match r.as_ref().map(|r| &r.verdict) {
                        Some(ClientVerdict::Valid(chain)) => {
                            chain.first().map(|c| c.info().id.clone())
                        }
                        _ => None,
                    })
            })
            .ok()
            .flatten();
        let Some(leaf) = leaf else {
            // A session without a verified certificate is not worth resuming here.
            return false;
        };
        if let Ok(mut map) = self.leaf_of.lock() {
            if map.len() >= 2 * SESSIONS {
                // The inner cache has evicted most of these by now; forgetting them only costs
                // full handshakes.
                map.clear();
            }
            map.insert(key.clone(), leaf);
        }
        self.inner.put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        if !self.admits(key) {
            return None;
        }
        self.inner.get(key)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        if !self.admits(key) {
            self.inner.take(key);
            return None;
        }
        self.inner.take(key)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// A domain's TLS settings, from which each connection's `ServerConfig` is made.
#[derive(Debug)]
pub(crate) struct DomainTls {
    pub(crate) config: Arc<ServerConfig>,
    pub(crate) verifier: Arc<DomainVerifier>,
    /// The server certificate, with the OCSP answer stapled to it when the node gives one.
    pub(crate) stapled: Arc<Stapled>,
}

/// A domain's server certificate and key, and the OCSP answer stapled to handshakes (replaced
/// as the node refreshes it, without rebuilding the domain).
#[derive(Debug)]
pub(crate) struct Stapled {
    key: arc_swap::ArcSwap<rustls::sign::CertifiedKey>,
}

impl Stapled {
    /// Staples `ocsp` (a DER OCSPResponse for the leaf) from now on.
    pub(crate) fn staple(&self, ocsp: Vec<u8>) {
        let current = self.key.load();
        let mut next = rustls::sign::CertifiedKey::new(current.cert.clone(), current.key.clone());
        next.ocsp = Some(ocsp);
        self.key.store(Arc::new(next));
    }

    /// The leaf certificate served.
    pub(crate) fn leaf(&self) -> Option<rustls::pki_types::CertificateDer<'static>> {
        self.key.load().cert.first().cloned()
    }
}

impl rustls::server::ResolvesServerCert for Stapled {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.key.load_full())
    }
}

impl DomainTls {
    pub(crate) fn new(
        domain: &Domain,
        registry: Arc<RegistryView>,
        mqtt: bool,
    ) -> Result<DomainTls, GatewayError> {
        let provider = provider_for(domain.policy);
        let versions: &[&'static rustls::SupportedProtocolVersion] = match domain.policy {
            SecurityPolicy::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            SecurityPolicy::Tls13 | SecurityPolicy::Tls13Pq => &[&rustls::version::TLS13],
            SecurityPolicy::Tls12Only => &[&rustls::version::TLS12],
        };
        let verifier = Arc::new(DomainVerifier::new(
            &domain.mtls,
            provider.signature_verification_algorithms,
            &domain.hostname.to_string(),
            domain.registry_mode,
            registry,
        ));
        let certified = rustls::sign::CertifiedKey::from_der(
            domain.certificate.chain.clone(),
            domain.certificate.key.clone_key(),
            &provider,
        )
        .map_err(|e| {
            GatewayError::Tls(format!(
                "domain {}: server certificate and key do not work together ({e})",
                domain.hostname
            ))
        })?;
        let stapled = Arc::new(Stapled {
            key: arc_swap::ArcSwap::from_pointee(certified),
        });
        let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .map_err(|e| GatewayError::Tls(format!("domain {}: {e}", domain.hostname)))?
            .with_client_cert_verifier(verifier.clone())
            .with_cert_resolver(stapled.clone());
        // AWS IoT's names too: its device SDKs offer only `x-amzn-mqtt-ca` on port 443, and
        // `x-amzn-http-ca` for HTTPS publish.
        config.alpn_protocols = vec![
            b"h2".to_vec(),
            b"http/1.1".to_vec(),
            b"x-amzn-http-ca".to_vec(),
        ];
        if mqtt {
            config.alpn_protocols.push(b"mqtt".to_vec());
            config.alpn_protocols.push(b"x-amzn-mqtt-ca".to_vec());
        }
        config.session_storage = match (domain.session_resumption, domain.registry_mode) {
            (false, _) => Arc::new(rustls::server::NoServerSessionStorage {}),
            (true, RegistryMode::Off) => ServerSessionMemoryCache::new(SESSIONS),
            (true, _) => Arc::new(AdmittedSessions {
                inner: ServerSessionMemoryCache::new(SESSIONS),
                leaf_of: Mutex::default(),
                verifier: verifier.clone(),
            }),
        };
        if !domain.session_resumption {
            // No session to resume: no TLS 1.3 tickets either (rustls would otherwise encode
            // each ticket's session, fail to store it, and send nothing).
            config.send_tls13_tickets = 0;
        }
        config.ignore_client_order = true;
        Ok(DomainTls {
            config: Arc::new(config),
            verifier,
            stapled,
        })
    }
}

/// aws-lc-rs with the policy's suites (AEAD with forward secrecy only) and key exchanges: the
/// post-quantum hybrid X25519MLKEM768 first on every policy (chosen whenever the client offers
/// it), and the only one on `TLS_1_3_PQ`.
pub(crate) fn provider_for(policy: SecurityPolicy) -> CryptoProvider {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites.retain(|suite| match suite {
        SupportedCipherSuite::Tls13(_) => policy != SecurityPolicy::Tls12Only,
        SupportedCipherSuite::Tls12(_) => {
            !matches!(policy, SecurityPolicy::Tls13 | SecurityPolicy::Tls13Pq)
        }
    });
    provider.kx_groups = match policy {
        SecurityPolicy::Tls13Pq => vec![rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768],
        _ => {
            let mut groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768];
            groups.extend(
                provider
                    .kx_groups
                    .iter()
                    .filter(|g| g.name() != rustls::NamedGroup::X25519MLKEM768),
            );
            groups
        }
    };
    // AES-128-GCM first (the server's preference decides, as Go and BoringSSL servers do): its
    // SHA-256 key schedule runs on the CPU's SHA extensions where SHA-384 has none, which makes a
    // full handshake markedly cheaper. AES-256-GCM and ChaCha20-Poly1305 remain available.
    provider.cipher_suites.sort_by_key(|suite| {
        !matches!(
            suite.suite(),
            CipherSuite::TLS13_AES_128_GCM_SHA256
                | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    provider
}
