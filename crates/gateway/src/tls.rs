//! Building one rustls `ServerConfig` per domain and state generation.
//!
//! A fresh config per generation also means a fresh session cache: a session resumed after a
//! truststore, CRL or certificate change would restore the old client chain without running the
//! verifier, so sessions never outlive the generation that verified them. Session tickets are
//! off (the default `NeverProducesTickets`), so the server-side cache is the only way to resume.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::ServerSessionMemoryCache;
use rustls::{CipherSuite, ServerConfig, SupportedCipherSuite};

use crate::GatewayError;
use crate::config::{Domain, SecurityPolicy};
use crate::verify::{DomainVerifier, RegistryHandle};

/// A domain's TLS settings, from which each connection's `ServerConfig` is made.
#[derive(Debug)]
pub(crate) struct DomainTls {
    pub(crate) config: Arc<ServerConfig>,
    pub(crate) verifier: Arc<DomainVerifier>,
}

impl DomainTls {
    pub(crate) fn new(
        domain: &Domain,
        registry: Arc<RegistryHandle>,
        mqtt: bool,
    ) -> Result<DomainTls, GatewayError> {
        let provider = provider_for(domain.policy);
        let versions: &[&'static rustls::SupportedProtocolVersion] = match domain.policy {
            SecurityPolicy::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            SecurityPolicy::Tls13 => &[&rustls::version::TLS13],
            SecurityPolicy::Tls12Only => &[&rustls::version::TLS12],
        };
        let verifier = Arc::new(DomainVerifier::new(
            &domain.mtls,
            provider.signature_verification_algorithms,
            &domain.hostname.to_string(),
            domain.registry_mode,
            registry,
        ));
        let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .map_err(|e| GatewayError::Tls(format!("domain {}: {e}", domain.hostname)))?
            .with_client_cert_verifier(verifier.clone())
            .with_single_cert(
                domain.certificate.chain.clone(),
                domain.certificate.key.clone_key(),
            )
            .map_err(|e| {
                GatewayError::Tls(format!(
                    "domain {}: server certificate and key do not work together ({e})",
                    domain.hostname
                ))
            })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        if mqtt {
            config.alpn_protocols.push(b"mqtt".to_vec());
        }
        config.session_storage = if domain.session_resumption {
            ServerSessionMemoryCache::new(4096)
        } else {
            Arc::new(rustls::server::NoServerSessionStorage {})
        };
        config.ignore_client_order = true;
        Ok(DomainTls {
            config: Arc::new(config),
            verifier,
        })
    }
}

/// aws-lc-rs with the policy's suites: AEAD with forward secrecy only.
fn provider_for(policy: SecurityPolicy) -> CryptoProvider {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites.retain(|suite| match suite {
        SupportedCipherSuite::Tls13(_) => policy != SecurityPolicy::Tls12Only,
        SupportedCipherSuite::Tls12(_) => policy != SecurityPolicy::Tls13,
    });
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
