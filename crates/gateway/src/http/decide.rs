//! The one decision on an HTTP request: Host, path, mapping, certificate requirement, upgrade,
//! policy. The HTTP/1.1 fast path, the hyper path and `explain` all call [`admit`], so what
//! `explain` says is what the gateway does. Pure: it reads the state generation and the
//! connection's verdict, and never blocks or does I/O.

use std::net::IpAddr;

use hyper::StatusCode;
use portcullis_policy::Outcome;

use crate::config::{Authorization, MtlsMode};
use crate::http::route;
use crate::verdict::ClientVerdict;
use crate::{DomainState, State, authorize};

/// What the decision needs of the connection.
pub(crate) struct Context<'a> {
    /// The state generation the connection started with.
    pub(crate) state: &'a State,
    /// Its domain, by index.
    pub(crate) domain: usize,
    /// Whether the default endpoint took it (no domain matched the SNI).
    pub(crate) via_default: bool,
    /// The SNI it was made for, lower-case.
    pub(crate) sni: Option<&'a str>,
    /// The certificate's verdict.
    pub(crate) verdict: &'a ClientVerdict,
    /// The client's address (policies' `aws:SourceIp`).
    pub(crate) peer: IpAddr,
}

/// What a request asks.
#[derive(Clone, Copy)]
pub(crate) struct Asked<'a> {
    pub(crate) method: &'a str,
    pub(crate) path: &'a str,
    pub(crate) query: Option<&'a str>,
    /// The Host (or :authority), lower-case, without port; empty when there is none.
    pub(crate) host: &'a str,
    /// The request asks to become a WebSocket tunnel.
    pub(crate) websocket: bool,
    /// A gRPC call (`content-type: application/grpc…`): policies may also name it as
    /// `grpc:Invoke` on `grpc:<package.Service>/<Method>`.
    pub(crate) grpc: bool,
}

/// Why a request is not forwarded.
pub(crate) enum Refusal {
    /// The Host header names another domain (421).
    Misdirected,
    /// HTTPS publish (`/topics/…`), answered by the gateway.
    HttpsPublish,
    /// The path means two things (400); the explanation.
    AmbiguousPath(String),
    /// No mapping matches (404).
    NoRoute,
    /// The mapping needs a valid client certificate (403).
    NeedsCertificate,
    /// A policy route without a Host header (400).
    NoHost,
    /// The policies refuse (403); their reason.
    PolicyDenied(String),
    /// A WebSocket upgrade on a mapping that does not tunnel them (400).
    UpgradeNotAllowed,
    /// A claim certificate, which may only provision a device (403).
    ClaimCertificate,
    /// A built-in service (fleet provisioning over HTTPS, EST), answered by the gateway.
    Builtin(crate::config::Builtin),
}

/// A request admitted to a mapping: its index, the path the upstream sees, and whether the
/// client's Host is the one forwarded (`X-Forwarded-Host`) or the domain's own name.
pub(crate) struct Admitted {
    pub(crate) index: usize,
    pub(crate) rest: String,
    pub(crate) client_host: bool,
}

impl Admitted {
    /// The host forwarded upstream: the client's when it named this domain, else the domain's.
    pub(crate) fn forwarded_host<'a>(
        &self,
        host: &'a str,
        domain: &DomainState,
    ) -> std::borrow::Cow<'a, str> {
        if self.client_host {
            std::borrow::Cow::Borrowed(host)
        } else {
            std::borrow::Cow::Owned(domain.config.hostname.to_string())
        }
    }
}

impl Refusal {
    /// The status and code the gateway answers with; `NeedsCertificate` answers 403 with the
    /// verdict's reason (`no-certificate` when none was presented).
    pub(crate) fn answer(&self, verdict: &ClientVerdict) -> (StatusCode, String) {
        match self {
            Refusal::Misdirected => (
                StatusCode::MISDIRECTED_REQUEST,
                "misdirected-request".into(),
            ),
            Refusal::HttpsPublish => (StatusCode::OK, "https-publish".into()),
            Refusal::AmbiguousPath(_) => (StatusCode::BAD_REQUEST, "ambiguous-path".into()),
            Refusal::NoRoute => (StatusCode::NOT_FOUND, "no-route".into()),
            Refusal::NeedsCertificate => (
                StatusCode::FORBIDDEN,
                match verdict {
                    ClientVerdict::Rejected { reason, .. } => reason.code().to_string(),
                    _ => "no-certificate".into(),
                },
            ),
            Refusal::NoHost => (StatusCode::BAD_REQUEST, "no-host".into()),
            Refusal::PolicyDenied(_) => (StatusCode::FORBIDDEN, "policy-denied".into()),
            Refusal::UpgradeNotAllowed => (StatusCode::BAD_REQUEST, "upgrade-refused".into()),
            Refusal::ClaimCertificate => (StatusCode::FORBIDDEN, "claim-certificate".into()),
            Refusal::Builtin(_) => (StatusCode::OK, "builtin".into()),
        }
    }
}

/// Routes and authorizes a request on a connection: the one decision the fast path, the hyper
/// path and `explain` take. On refusal, the mapping it was routed to (if any), for the metrics
/// and the log.
pub(crate) fn admit(
    ctx: &Context<'_>,
    asked: &Asked<'_>,
) -> Result<Admitted, (Refusal, Option<usize>)> {
    let Asked {
        method,
        path,
        query,
        host,
        websocket,
        grpc,
    } = *asked;
    let domain: &DomainState = &ctx.state.domains[ctx.domain];
    // The Host must name the domain this connection was made for, resolved as SNI is (exact
    // names before wildcards): a browser coalescing connections, or a client choosing another
    // domain's truststore by SNI, gets 421. The default endpoint serves hosts that name no
    // domain, under the default domain's own name.
    let client_host = if host.is_empty() {
        false
    } else if !ctx.via_default && ctx.sni == Some(host) {
        true
    } else {
        match ctx.state.domain_for(host) {
            Some(i) if i == ctx.domain => true,
            None if ctx.via_default => false,
            _ => return Err((Refusal::Misdirected, None)),
        }
    };
    if domain.config.mqtt.https_publish && path.starts_with("/topics/") {
        return Err((Refusal::HttpsPublish, None));
    }
    // The path must mean one thing: upstreams resolve dot-segments, decode escapes and more, so
    // a path that routes differently once read that way is refused on every domain. Domains
    // with policy-authorized mappings refuse every ambiguous spelling, since policies decide on
    // the decoded path.
    let mappings = &domain.config.mappings;
    let policy_domain = mappings
        .iter()
        .any(|m| m.authorization == Authorization::Policy);
    let decoded = if policy_domain {
        match authorize::policy_path(path) {
            Ok(decoded) => Some(decoded),
            Err(why) => {
                return Err((
                    Refusal::AmbiguousPath(format!(
                        "the path holds {why}, which this domain refuses"
                    )),
                    None,
                ));
            }
        }
    } else {
        None
    };
    let Some((mapping, rest)) = route::route(mappings, path) else {
        return Err((Refusal::NoRoute, None));
    };
    let index = mappings
        .iter()
        .position(|m| std::ptr::eq(m, mapping))
        .unwrap_or_default();
    let refuse = |r: Refusal| Err((r, Some(index)));
    if let Err(why) = route::check_reading(path, mapping, mappings) {
        return refuse(Refusal::AmbiguousPath(format!(
            "the path holds {why}, which this domain refuses"
        )));
    }
    if let Some(decoded) = &decoded
        && !route::route(mappings, decoded).is_some_and(|(m, _)| std::ptr::eq(m, mapping))
    {
        return refuse(Refusal::AmbiguousPath(
            "the path routes to another mapping once percent-decoded".into(),
        ));
    }
    let mode = domain.config.mtls.mode;
    let needs_cert =
        mode == MtlsMode::Required || (mode == MtlsMode::Optional && mapping.require_client_cert);
    // A certificate in its grace period reaches EST (to renew itself) and nothing else.
    let renewing =
        ctx.verdict.renew_only().is_some() && mapping.builtin == Some(crate::config::Builtin::Est);
    if needs_cert && !matches!(ctx.verdict, ClientVerdict::Valid(_)) && !renewing {
        return refuse(Refusal::NeedsCertificate);
    }
    if websocket && !mapping.websocket {
        return refuse(Refusal::UpgradeNotAllowed);
    }
    if let Some(builtin) = mapping.builtin {
        return refuse(Refusal::Builtin(builtin));
    }
    // A claim certificate is good for provisioning only: never forwarded, whatever the mapping.
    if let ClientVerdict::Valid(chain) = &ctx.verdict
        && let Some(leaf) = chain.first()
        && domain
            .tls
            .verifier
            .registry_snapshot()
            .policies()
            .claim_templates(leaf)
            .is_some()
    {
        return refuse(Refusal::ClaimCertificate);
    }
    if mapping.authorization == Authorization::Policy {
        // Frameworks (Rails, Laravel, Express) run `_method=DELETE` in the query as a DELETE,
        // while policies decide on the request's own method.
        let overrides = |p: &str| {
            let key = p.split('=').next().unwrap_or_default();
            key == "_method" || authorize::percent_decode(key).as_deref() == Some("_method")
        };
        if query.is_some_and(|q| q.split('&').any(overrides)) {
            return refuse(Refusal::AmbiguousPath(
                "a _method query parameter (a method override), which policy-authorized routes refuse"
                    .into(),
            ));
        }
        let decoded = decoded.unwrap_or_default();
        let leaf = match ctx.verdict {
            ClientVerdict::Valid(chain) => chain.first(),
            _ => None,
        };
        let route_host = if ctx.via_default {
            domain.config.hostname.to_string()
        } else if host.is_empty() {
            // HTTP/1.0 without Host: policies name hosts, so refuse rather than guess.
            return refuse(Refusal::NoHost);
        } else {
            host.to_string()
        };
        let snapshot = domain.tls.verifier.registry_snapshot();
        let policies = snapshot.policies();
        let domain_name = domain.config.hostname.to_string();
        let action = format!("http:{method}");
        let route = format!("route:{route_host}{decoded}");
        // A gRPC call is also `grpc:Invoke` on `grpc:<package.Service>/<Method>`: either may
        // allow it, an explicit Deny in either refuses it.
        let call = match decoded.strip_prefix('/') {
            Some(rpc) if grpc && method == "POST" => Some(format!("grpc:{rpc}")),
            _ => None,
        };
        let outcome = |action: &str, resource: &str| {
            policies.outcome(leaf, &domain_name, action, resource, ctx.peer)
        };
        let first = outcome(&action, &route);
        let second = call.as_deref().map(|call| outcome("grpc:Invoke", call));
        if !admits(first, second) {
            // Refused: the full decisions, for the reason.
            let decide = |action: &str, resource: &str| {
                policies.decide(leaf, &domain_name, action, resource, ctx.peer)
            };
            let mut decision = decide(&action, &route);
            if let Some(call) = &call {
                decision = either(decision, decide("grpc:Invoke", call));
            }
            return refuse(Refusal::PolicyDenied(decision.reason));
        }
    }
    Ok(Admitted {
        index,
        rest,
        client_host,
    })
}

/// [`either`]'s rule on outcomes: an explicit Deny in either refuses, else an Allow in either
/// admits.
fn admits(first: Outcome, second: Option<Outcome>) -> bool {
    let Some(second) = second else {
        return first.allowed();
    };
    let denies = |o: Outcome| matches!(o, Outcome::Denied | Outcome::Refused);
    !denies(first) && !denies(second) && (first.allowed() || second.allowed())
}

/// Two decisions on one request, under two names: an explicit Deny in either wins, then an
/// Allow in either; nothing applying to either is the default denial, naming both.
fn either(
    first: portcullis_policy::Decision,
    second: portcullis_policy::Decision,
) -> portcullis_policy::Decision {
    let denies = |d: &portcullis_policy::Decision| !d.allowed && d.by.is_some();
    if denies(&first) {
        return first;
    }
    if denies(&second) || (second.allowed && !first.allowed) {
        return second;
    }
    if first.allowed {
        return first;
    }
    portcullis_policy::Decision {
        allowed: false,
        by: None,
        reason: format!("{}; {}", first.reason, second.reason),
    }
}

/// A host as routing compares it: lower-case, without port or IPv6 brackets.
pub(crate) fn normalize_host(text: &str) -> String {
    let host = match text.rsplit_once(':') {
        Some((h, port)) if !h.ends_with(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => text,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    // An absolute name (`a.test.`) is the same host.
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

#[cfg(test)]
mod either_tests {
    use portcullis_policy::{Decision, Effect, StatementRef};

    fn d(allowed: bool, by: bool, reason: &str) -> Decision {
        Decision {
            allowed,
            by: by.then(|| StatementRef {
                policy: "p".into(),
                version: 1,
                index: 0,
                sid: None,
                effect: if allowed { Effect::Allow } else { Effect::Deny },
            }),
            reason: reason.into(),
        }
    }

    #[test]
    fn an_explicit_deny_under_either_name_wins_then_an_allow() {
        use super::either;
        let (allow, deny, nothing) = (
            d(true, true, "a"),
            d(false, true, "d"),
            d(false, false, "n"),
        );
        assert!(!either(allow.clone(), deny.clone()).allowed);
        assert!(!either(deny.clone(), allow.clone()).allowed);
        assert!(either(nothing.clone(), allow.clone()).allowed);
        assert!(either(allow.clone(), nothing.clone()).allowed);
        let neither = either(nothing.clone(), d(false, false, "m"));
        assert!(!neither.allowed && neither.reason == "n; m");
    }

    /// The allocation-free rule used first agrees with `either` on every pair.
    #[test]
    fn admits_agrees_with_either() {
        use portcullis_policy::Outcome;

        use super::{admits, either};
        let all = [
            (Outcome::Allowed, d(true, true, "a")),
            (Outcome::Denied, d(false, true, "d")),
            (Outcome::Unmatched, d(false, false, "n")),
        ];
        for (o1, d1) in &all {
            assert_eq!(admits(*o1, None), d1.allowed);
            for (o2, d2) in &all {
                assert_eq!(
                    admits(*o1, Some(*o2)),
                    either(d1.clone(), d2.clone()).allowed,
                    "{o1:?} {o2:?}"
                );
            }
        }
        assert!(!admits(Outcome::Refused, None));
        assert!(!admits(Outcome::Refused, Some(Outcome::Refused)));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use portcullis_pki::issue::issue;
    use portcullis_pki::{
        CaIssuer, Certificate, IssueRequest, KeyType, PrivateKey, Profile, RejectReason,
        SubjectAltName, SubjectName, Truststore,
    };
    use rustls::pki_types::PrivateKeyDer;

    use super::*;
    use crate::config::{
        Config, Domain, Hostname, Listener, Mapping, MqttSettings, Mtls, RegistryMode,
        ResponseHeaders, SecurityPolicy, ServerCertificate,
    };
    use crate::registry_view::RegistryView;

    struct Pki {
        ca: CaIssuer,
        trust: Arc<Truststore>,
    }

    fn pki() -> Pki {
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let root = issue(
            &IssueRequest::new(Profile::RootCa, SubjectName::cn("Decide Root")),
            &key,
            None,
        )
        .unwrap();
        let trust = Arc::new(Truststore::from_pem(root.to_pem().as_bytes()).unwrap());
        Pki {
            ca: CaIssuer::new(root, key, Vec::new()).unwrap(),
            trust,
        }
    }

    fn client(pki: &Pki, cn: &str) -> Certificate {
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        issue(
            &IssueRequest::new(Profile::Client, SubjectName::cn(cn)),
            &key,
            Some(&pki.ca),
        )
        .unwrap()
    }

    fn domain(pki: &Pki, host: &str, mode: MtlsMode, mappings: Vec<Mapping>) -> Domain {
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let mut req = IssueRequest::new(Profile::Server, SubjectName::cn(host));
        req.subject_alt_names = vec![SubjectAltName::Dns(host.into())];
        let cert = issue(&req, &key, Some(&pki.ca)).unwrap();
        let mut mtls = Mtls::off();
        mtls.mode = mode;
        if mode != MtlsMode::Off {
            mtls.truststore = Some(pki.trust.clone());
        }
        Domain {
            hostname: Hostname::parse(host).unwrap(),
            certificate: ServerCertificate {
                chain: vec![cert.der().clone()],
                key: PrivateKeyDer::Pkcs8(key.pkcs8_der().to_vec().into()),
            },
            policy: SecurityPolicy::Tls12,
            mtls,
            mappings,
            session_resumption: false,
            registry_mode: RegistryMode::Off,
            mqtt: MqttSettings {
                https_publish: true,
                ..MqttSettings::default()
            },
            underscores_in_headers: false,
            response_headers: ResponseHeaders::default(),
        }
    }

    /// Requests × domains × verdicts → admitted, 400, 403, 404 or 421, without a socket.
    #[test]
    fn requests_are_admitted_or_refused_as_the_table_says() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let pki = pki();
        let upstream = "http://127.0.0.1:9";
        let open = Mapping::new("/open", upstream, false).unwrap();
        let api = Mapping::new("/api", upstream, true)
            .unwrap()
            .with_authorization(Authorization::Policy);
        let rest = Mapping::new("", upstream, true).unwrap();
        let svc = Mapping::new("/svc", upstream, true)
            .unwrap()
            .with_websocket(false);
        let config = Config::new(
            vec![Listener::http("127.0.0.1:0".parse().unwrap())],
            vec![
                domain(&pki, "opt.test", MtlsMode::Optional, vec![open, api, rest]),
                domain(&pki, "b.test", MtlsMode::Required, vec![svc]),
            ],
            None,
        )
        .unwrap();
        let state = State::build(&config, 1, &Arc::new(RegistryView::empty())).unwrap();
        let alice = client(&pki, "alice");
        let valid = ClientVerdict::Valid(Arc::new(vec![alice.clone()]));
        let refused = ClientVerdict::Rejected {
            leaf: Some(Box::new(alice)),
            reason: RejectReason::Expired.into(),
            explanation: String::new(),
        };
        let none = ClientVerdict::None;
        // (domain index, verdict, method, path, host, websocket) → outcome
        let table: Vec<(usize, &ClientVerdict, &str, &str, &str, bool, &str)> = vec![
            (
                0,
                &valid,
                "GET",
                "/open/x",
                "opt.test",
                false,
                "admitted /open /x",
            ),
            (
                0,
                &none,
                "GET",
                "/open/x",
                "opt.test",
                false,
                "admitted /open /x",
            ),
            (0, &refused, "GET", "/x", "opt.test", false, "403 expired"),
            (
                0,
                &none,
                "GET",
                "/x",
                "opt.test",
                false,
                "403 no-certificate",
            ),
            (
                0,
                &valid,
                "GET",
                "/openx",
                "opt.test",
                false,
                "admitted  /openx",
            ),
            (
                0,
                &valid,
                "GET",
                "/x",
                "b.test",
                false,
                "421 misdirected-request",
            ),
            (
                0,
                &valid,
                "GET",
                "/x",
                "elsewhere.test",
                false,
                "421 misdirected-request",
            ),
            (0, &valid, "GET", "/x", "", false, "admitted  /x"),
            (
                0,
                &valid,
                "GET",
                "/open/../api/x",
                "opt.test",
                false,
                "400 ambiguous-path",
            ),
            (
                0,
                &valid,
                "GET",
                "/api/%2e%2e/x",
                "opt.test",
                false,
                "400 ambiguous-path",
            ),
            (
                0,
                &valid,
                "GET",
                "/api/x",
                "opt.test",
                false,
                "403 policy-denied",
            ),
            (
                0,
                &valid,
                "POST",
                "/topics/t",
                "opt.test",
                false,
                "200 https-publish",
            ),
            (
                1,
                &valid,
                "GET",
                "/svc/x",
                "b.test",
                false,
                "admitted /svc /x",
            ),
            (
                1,
                &valid,
                "GET",
                "/svc/x",
                "b.test",
                true,
                "400 upgrade-refused",
            ),
            (1, &valid, "GET", "/other", "b.test", false, "404 no-route"),
            (1, &valid, "GET", "/svcx", "b.test", false, "404 no-route"),
            (
                1,
                &valid,
                "GET",
                "/svc/%2e%2e/other",
                "b.test",
                false,
                "400 ambiguous-path",
            ),
        ];
        for (domain, verdict, method, path, host, websocket, want) in table {
            let sni = ["opt.test", "b.test"][domain];
            let ctx = Context {
                state: &state,
                domain,
                via_default: false,
                sni: Some(sni),
                verdict,
                peer: IpAddr::from([127, 0, 0, 1]),
            };
            let asked = Asked {
                method,
                path,
                query: None,
                host,
                websocket,
                grpc: false,
            };
            let got = match admit(&ctx, &asked) {
                Ok(a) => format!(
                    "admitted {} {}",
                    state.domains[domain].config.mappings[a.index].base_path, a.rest
                ),
                Err((refusal, _)) => {
                    let (status, code) = refusal.answer(verdict);
                    format!("{} {code}", status.as_u16())
                }
            };
            assert_eq!(got, want, "{method} {path} (Host {host:?}) on {sni}");
        }
    }
}
