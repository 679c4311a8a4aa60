//! ACME challenge answers the gateway serves while a node orders a certificate: TLS-ALPN-01 on
//! the TLS listeners (RFC 8737: a ClientHello that offers only `acme-tls/1`, for a name with a
//! pending challenge, gets the challenge certificate and nothing else), and HTTP-01 key
//! authorizations for the node's plain HTTP responder. Replaced as a whole when the registry's
//! pending challenges change; read without locks by the handshake.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;

use crate::GatewayError;

/// The ALPN protocol of TLS-ALPN-01.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// A challenge type the gateway answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChallengeKind {
    /// HTTP-01: `GET /.well-known/acme-challenge/TOKEN` on port 80.
    Http01,
    /// TLS-ALPN-01: a handshake with ALPN `acme-tls/1` on port 443.
    TlsAlpn01,
}

/// One pending challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChallengeAnswer {
    /// The name being validated (lower case).
    pub hostname: String,
    /// How it is validated.
    pub kind: ChallengeKind,
    /// The challenge's token.
    pub token: String,
    /// The key authorization (token.thumbprint).
    pub key_authorization: String,
    /// When it stops being answered (milliseconds since the epoch), whatever happens to the
    /// order.
    pub expires_ms: i64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[derive(Default)]
struct Set {
    answers: Vec<ChallengeAnswer>,
    /// TLS-ALPN-01: the handshake configuration per hostname, and until when.
    alpn: HashMap<String, (Arc<ServerConfig>, i64)>,
    /// HTTP-01: the key authorization per token, and until when.
    http: HashMap<String, (String, i64)>,
}

/// The pending challenges.
pub struct AcmeChallenges {
    set: ArcSwap<Set>,
}

impl std::fmt::Debug for AcmeChallenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeChallenges")
            .field("answers", &self.set.load().answers)
            .finish()
    }
}

impl Default for AcmeChallenges {
    fn default() -> Self {
        AcmeChallenges {
            set: ArcSwap::from_pointee(Set::default()),
        }
    }
}

impl AcmeChallenges {
    /// Serves exactly `answers` from now on. A TLS-ALPN-01 answer already served keeps its
    /// certificate; new ones get a fresh self-signed one.
    pub fn replace(&self, answers: &[ChallengeAnswer]) -> Result<(), GatewayError> {
        let current = self.set.load();
        if current.answers == answers {
            return Ok(());
        }
        let mut set = Set {
            answers: answers.to_vec(),
            ..Set::default()
        };
        for a in answers {
            match a.kind {
                ChallengeKind::Http01 => {
                    set.http
                        .insert(a.token.clone(), (a.key_authorization.clone(), a.expires_ms));
                }
                ChallengeKind::TlsAlpn01 => {
                    let kept = current
                        .answers
                        .iter()
                        .any(|old| old == a)
                        .then(|| current.alpn.get(&a.hostname).map(|(c, _)| c.clone()))
                        .flatten();
                    let config = match kept {
                        Some(config) => config,
                        None => Arc::new(alpn_config(&a.hostname, &a.key_authorization)?),
                    };
                    set.alpn.insert(a.hostname.clone(), (config, a.expires_ms));
                }
            }
        }
        self.set.store(Arc::new(set));
        Ok(())
    }

    /// The key authorization to answer `GET /.well-known/acme-challenge/{token}` with.
    pub fn http_answer(&self, token: &str) -> Option<String> {
        let set = self.set.load();
        let (answer, until) = set.http.get(token)?;
        (now_ms() <= *until).then(|| answer.clone())
    }

    /// The handshake answering a TLS-ALPN-01 challenge for `hostname`, if one is pending.
    pub(crate) fn tls_alpn(&self, hostname: &str) -> Option<Arc<ServerConfig>> {
        let set = self.set.load();
        if set.alpn.is_empty() {
            return None;
        }
        let (config, until) = set.alpn.get(hostname)?;
        (now_ms() <= *until).then(|| config.clone())
    }
}

/// A handshake that presents the challenge certificate and speaks only `acme-tls/1`, asking no
/// client certificate (the CA's validation server has none).
fn alpn_config(hostname: &str, key_authorization: &str) -> Result<ServerConfig, GatewayError> {
    let (cert, key) = portcullis_pki::acme::tls_alpn_certificate(hostname, key_authorization)
        .map_err(|e| {
            GatewayError::Tls(format!("the TLS-ALPN-01 certificate of {hostname}: {e}"))
        })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let signing = provider
        .key_provider
        .load_private_key(rustls::pki_types::PrivateKeyDer::Pkcs8(
            key.pkcs8_der().to_vec().into(),
        ))
        .map_err(|e| GatewayError::Tls(format!("the TLS-ALPN-01 key of {hostname}: {e}")))?;
    // Given to rustls as is: its certificate checks (made when a certificate is configured the
    // usual way) refuse the critical acmeIdentifier extension the CA looks for.
    let certified = rustls::sign::CertifiedKey::new(vec![cert.der().clone()], signing);
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| GatewayError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(Arc::new(certified))));
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The challenge certificate, whatever the ClientHello.
#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_replaced_whole_and_tls_alpn_certificates_kept_while_pending() {
        let c = AcmeChallenges::default();
        let alpn = ChallengeAnswer {
            hostname: "a.test".into(),
            kind: ChallengeKind::TlsAlpn01,
            token: "t1".into(),
            key_authorization: "t1.k".into(),
            expires_ms: now_ms() + 60_000,
        };
        let http = ChallengeAnswer {
            hostname: "b.test".into(),
            kind: ChallengeKind::Http01,
            token: "t2".into(),
            key_authorization: "t2.k".into(),
            expires_ms: now_ms() + 60_000,
        };
        c.replace(&[alpn.clone(), http.clone()]).unwrap();
        let first = c.tls_alpn("a.test").unwrap();
        assert_eq!(first.alpn_protocols, vec![ACME_TLS_ALPN.to_vec()]);
        assert!(c.tls_alpn("b.test").is_none());
        assert_eq!(c.http_answer("t2").as_deref(), Some("t2.k"));
        assert_eq!(c.http_answer("t1"), None);
        c.replace(std::slice::from_ref(&alpn)).unwrap();
        assert!(Arc::ptr_eq(&first, &c.tls_alpn("a.test").unwrap()));
        assert_eq!(c.http_answer("t2"), None);
        c.replace(&[]).unwrap();
        assert!(c.tls_alpn("a.test").is_none());
        // Expired answers are not served, whatever the registry says.
        let expired = ChallengeAnswer {
            expires_ms: now_ms() - 1,
            ..alpn
        };
        let gone = ChallengeAnswer {
            expires_ms: now_ms() - 1,
            ..http
        };
        c.replace(&[expired, gone]).unwrap();
        assert!(c.tls_alpn("a.test").is_none());
        assert_eq!(c.http_answer("t2"), None);
    }
}
