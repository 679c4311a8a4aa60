//! Policy authorization of requests on mappings with `authorization = "policy"`.
//!
//! The registry's policies arrive in the [`PolicySnapshot`] inside the registry snapshot: each
//! policy's default version compiled once, where each is attached, and what policy variables
//! need from the registry (a certificate's things and their attributes, its CA). A request
//! binds the policies that apply to its certificate and domain (cached per certificate, domain
//! and snapshot) and decides `http:<METHOD>` on `route:<host><path>`. A new snapshot — any
//! registry change — applies to the next request, on open connections too.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use portcullis_pki::Certificate;
use portcullis_policy::context::{self, Subject};
use portcullis_policy::{Bound, Decision, Policy, PolicyRef, Request as PolicyRequest, Variables};
use serde_json::{Value, json};

/// What a policy is attached to (the policy crate's [`context::Target`]).
pub use portcullis_policy::context::Target as PolicyTarget;

/// The registry's policies as the data path needs them.
#[derive(Debug, Default)]
pub struct PolicySnapshot {
    policies: HashMap<String, (PolicyRef, Arc<Policy>)>,
    attached: HashMap<PolicyTarget, Vec<String>>,
    things_of: HashMap<String, Vec<String>>,
    thing_attributes: HashMap<String, BTreeMap<String, String>>,
    ca_of: HashMap<String, String>,
    /// Claim certificates: the templates each may use and the built-in policy they get
    /// instead of any attached one.
    claims: HashMap<String, (Vec<String>, Option<Arc<Policy>>)>,
    /// Claim CAs: every certificate each issues is a claim certificate for its templates.
    claim_cas: Vec<ClaimCa>,
    /// Names of the things that have a certificate or attributes (a claim may not connect
    /// under one of them).
    thing_names: std::collections::HashSet<String>,
    /// Bound policies per (certificate id, domain): valid for this snapshot only.
    cache: Mutex<HashMap<(String, String), Arc<Bound>>>,
}

/// A claim CA: every certificate it issues gets its built-in claim policy.
#[derive(Debug)]
struct ClaimCa {
    ca: Certificate,
    templates: Vec<String>,
    policy: Option<Arc<Policy>>,
}

/// Bound sets kept per snapshot before the cache starts over.
const CACHE_LIMIT: usize = 100_000;

impl PolicySnapshot {
    /// An empty snapshot.
    pub fn new() -> PolicySnapshot {
        PolicySnapshot::default()
    }

    /// Makes `certificate_id` a claim certificate for `templates`: whatever is attached to it,
    /// its only policy is the built-in claim policy ([`claim_policy`]).
    pub fn set_claim(&mut self, certificate_id: &str, templates: Vec<String>) {
        let policy = claim_policy(&templates).map(Arc::new);
        self.claims
            .insert(certificate_id.to_string(), (templates, policy));
    }

    /// Makes `ca` a claim CA for `templates`: every certificate it issues is a claim
    /// certificate, registered or not.
    pub fn set_claim_ca(&mut self, ca: Certificate, templates: Vec<String>) {
        let policy = claim_policy(&templates).map(Arc::new);
        self.claim_cas.push(ClaimCa {
            ca,
            templates,
            policy,
        });
    }

    /// The templates a claim certificate may use (marked itself, or issued by a claim CA);
    /// `None` for any other certificate.
    pub fn claim_templates(&self, leaf: &Certificate) -> Option<&[String]> {
        self.claim(leaf).map(|(templates, _)| templates)
    }

    /// Whether a claim CA issued `leaf` (admitted unregistered: its policy is the claim's).
    pub(crate) fn claim_ca_issued(&self, leaf: &Certificate) -> bool {
        self.claim_ca_of(leaf).is_some()
    }

    fn claim(&self, leaf: &Certificate) -> Option<(&[String], Option<&Arc<Policy>>)> {
        if let Some((templates, policy)) = self.claims.get(&leaf.info().id) {
            return Some((templates, policy.as_ref()));
        }
        self.claim_ca_of(leaf)
            .map(|c| (c.templates.as_slice(), c.policy.as_ref()))
    }

    fn claim_ca_of(&self, leaf: &Certificate) -> Option<&ClaimCa> {
        // The name first (cheap); the signature only for a CA whose subject is the issuer.
        self.claim_cas
            .iter()
            .find(|c| c.ca.info().subject == leaf.info().issuer && leaf.is_signed_by(&c.ca))
    }

    /// Adds a policy (its default version).
    pub fn add_policy(&mut self, name: &str, version: i64, policy: Arc<Policy>) {
        self.policies.insert(
            name.to_string(),
            (
                PolicyRef {
                    name: name.to_string(),
                    version,
                },
                policy,
            ),
        );
    }

    /// Attaches a policy to a target.
    pub fn attach(&mut self, target: PolicyTarget, policy: &str) {
        let list = self.attached.entry(target).or_default();
        if !list.iter().any(|p| p == policy) {
            list.push(policy.to_string());
        }
    }

    /// Records that a certificate is attached to a thing.
    pub fn add_thing_of(&mut self, certificate_id: &str, thing: &str) {
        self.thing_names.insert(thing.to_string());
        self.things_of
            .entry(certificate_id.to_string())
            .or_default()
            .push(thing.to_string());
    }

    /// A thing's attributes.
    pub fn set_thing_attributes(&mut self, thing: &str, attributes: BTreeMap<String, String>) {
        self.thing_names.insert(thing.to_string());
        self.thing_attributes.insert(thing.to_string(), attributes);
    }

    /// Whether a thing named `name` exists with a certificate or attributes.
    pub(crate) fn is_thing(&self, name: &str) -> bool {
        self.thing_names.contains(name)
    }

    /// The registered CA of a certificate.
    pub fn set_ca_of(&mut self, certificate_id: &str, ca_id: &str) {
        self.ca_of
            .insert(certificate_id.to_string(), ca_id.to_string());
    }

    /// Whether a policy is attached to some CA (then registering a certificate changes which
    /// policies apply to it).
    pub fn has_ca_policies(&self) -> bool {
        self.attached
            .keys()
            .any(|t| matches!(t, PolicyTarget::Ca(_)))
    }

    /// How many policies it holds.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Whether it holds no policy.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// What the registry knows about `leaf`, for [`context`]: its things with their
    /// attributes and its CA.
    fn with_subject<T>(
        &self,
        leaf: Option<&Certificate>,
        f: impl FnOnce(Option<&Subject<'_>>) -> T,
    ) -> T {
        let Some(leaf) = leaf else {
            return f(None);
        };
        let id = &leaf.info().id;
        let none = BTreeMap::new();
        let things: Vec<(&str, &BTreeMap<String, String>)> = self
            .things_of(id)
            .iter()
            .map(|t| (t.as_str(), self.thing_attributes.get(t).unwrap_or(&none)))
            .collect();
        f(Some(&Subject {
            leaf,
            id,
            things: &things,
            ca: self.ca_of.get(id).map(String::as_str),
        }))
    }

    /// The variables of a connection ([`context::variables`]).
    pub(crate) fn variables(
        &self,
        leaf: Option<&Certificate>,
        client_id: Option<&str>,
    ) -> Variables {
        self.with_subject(leaf, |subject| context::variables(subject, client_id))
    }

    /// The policies that apply to a certificate on a domain ([`context::applicable`]), with
    /// what each is attached to.
    pub(crate) fn applicable(
        &self,
        leaf: Option<&Certificate>,
        domain: &str,
    ) -> Vec<(PolicyRef, Arc<Policy>, String)> {
        if let Some((_, policy)) = leaf.and_then(|l| self.claim(l)) {
            let r = PolicyRef {
                name: CLAIM_POLICY.to_string(),
                version: 1,
            };
            // Without its built-in policy (it failed to compile), a claim gets none: denied.
            return policy
                .map(|p| vec![(r, Arc::clone(p), "the certificate (a claim)".to_string())])
                .unwrap_or_default();
        }
        let targets = self.with_subject(leaf, |subject| context::targets(subject, Some(domain)));
        context::applicable(&targets, |t| {
            self.attached
                .get(t)
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
        })
        .into_iter()
        .filter_map(|(name, via)| {
            let (r, p) = self.policies.get(&name)?;
            Some((r.clone(), p.clone(), via.describe()))
        })
        .collect()
    }

    /// The names of the things a certificate is attached to.
    pub(crate) fn things_of(&self, certificate_id: &str) -> &[String] {
        self.things_of
            .get(certificate_id)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The policies of an MQTT session bound to its variables (`${mqtt:ClientId}` included);
    /// not cached here: the session keeps it until the snapshot changes.
    pub(crate) fn bind_mqtt(&self, leaf: &Certificate, domain: &str, client_id: &str) -> Bound {
        let policies: Vec<(PolicyRef, Arc<Policy>)> = self
            .applicable(Some(leaf), domain)
            .into_iter()
            .map(|(r, p, _)| (r, p))
            .collect();
        let vars = self.variables(Some(leaf), Some(client_id));
        portcullis_policy::bind(&policies, &vars)
    }

    /// The bound policies of a certificate on a domain, from the cache when possible.
    fn bound(&self, leaf: Option<&Certificate>, domain: &str) -> Arc<Bound> {
        let key = (
            leaf.map(|l| l.info().id.clone()).unwrap_or_default(),
            domain.to_string(),
        );
        if let Ok(cache) = self.cache.lock()
            && let Some(b) = cache.get(&key)
        {
            return b.clone();
        }
        let policies: Vec<(PolicyRef, Arc<Policy>)> = self
            .applicable(leaf, domain)
            .into_iter()
            .map(|(r, p, _)| (r, p))
            .collect();
        let bound = Arc::new(portcullis_policy::bind(
            &policies,
            &self.variables(leaf, None),
        ));
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(key, bound.clone());
        }
        bound
    }

    /// Decides a request with [`decide_named`]'s rule for server topics.
    pub(crate) fn decide_named(
        &self,
        leaf: Option<&Certificate>,
        domain: &str,
        action: &str,
        resource: &str,
        source_ip: IpAddr,
    ) -> Result<(), String> {
        decide_named(
            &self.bound(leaf, domain),
            &request(action, resource, source_ip),
        )
    }

    /// What [`Policies::decide`] would answer, without its reason (no allocation).
    pub(crate) fn outcome(
        &self,
        leaf: Option<&Certificate>,
        domain: &str,
        action: &str,
        resource: &str,
        source_ip: IpAddr,
    ) -> portcullis_policy::Outcome {
        self.bound(leaf, domain)
            .outcome(&request(action, resource, source_ip))
    }

    /// Decides a request.
    pub(crate) fn decide(
        &self,
        leaf: Option<&Certificate>,
        domain: &str,
        action: &str,
        resource: &str,
        source_ip: IpAddr,
    ) -> Decision {
        self.bound(leaf, domain)
            .decide(&request(action, resource, source_ip))
    }

    /// The decision with the policies, variables and per-statement trace (`explain`).
    pub(crate) fn explain(
        &self,
        leaf: Option<&Certificate>,
        domain: &str,
        action: &str,
        resource: &str,
    ) -> Value {
        let applicable = self.applicable(leaf, domain);
        let vars = self.variables(leaf, None);
        let policies: Vec<(PolicyRef, Arc<Policy>)> = applicable
            .iter()
            .map(|(r, p, _)| (r.clone(), p.clone()))
            .collect();
        let bound = portcullis_policy::bind(&policies, &vars);
        let request = PolicyRequest {
            action,
            resource,
            source_ip: None,
            now: now(),
        };
        let decision = bound.decide(&request);
        let variables: BTreeMap<&str, &[String]> = vars.iter().collect();
        json!({
            "action": action,
            "resource": resource,
            "decision": if decision.allowed { "allow" } else { "deny" },
            "reason": decision.reason,
            "statement": decision.by,
            "policies": applicable.iter().map(|(r, _, via)| json!({"name": r.name, "version": r.version, "attached_to": via})).collect::<Vec<_>>(),
            "variables": variables,
            "trace": bound.trace(&request),
        })
    }
}

/// A request from `source_ip` now.
fn request<'a>(action: &'a str, resource: &'a str, source_ip: IpAddr) -> PolicyRequest<'a> {
    PolicyRequest {
        action,
        resource,
        source_ip: Some(source_ip),
        now: now(),
    }
}

/// Whether `bound` allows `request`; the reason when not. Server topics (`$…`) need an Allow
/// statement that names them: one that would also allow a made-up `$` topic (a wildcard such as
/// `topic:*`) does not count.
pub(crate) fn decide_named(bound: &Bound, request: &PolicyRequest<'_>) -> Result<(), String> {
    if !bound.outcome(request).allowed() {
        // Only a refusal needs the reason (and its allocations).
        return Err(bound.decide(request).reason);
    }
    if let Some((kind, rest)) = request.resource.split_once(':')
        && rest.starts_with('$')
    {
        let probe = format!("{kind}:$portcullis-unnamed/probe");
        let real = bound.trace(request);
        let unnamed = bound.trace(&PolicyRequest {
            resource: &probe,
            ..*request
        });
        let named = real.iter().zip(&unnamed).any(|(r, p)| {
            r.applied && r.statement.effect == portcullis_policy::Effect::Allow && !p.applied
        });
        if !named {
            return Err(format!(
                "{} is a server topic: a policy must name it, not match it with a wildcard",
                request.resource
            ));
        }
    }
    Ok(())
}

/// The name the built-in policy of a certificate in its grace period is shown with.
pub const RENEW_ONLY_POLICY: &str = "builtin:renew-only";

/// The bound policy of a certificate in its grace period (expired, its template lets it renew
/// for a while): connect, nothing else — the renewal topics are every device's own
/// (`fleet::self_service`), and the node answers only a renewal for it.
pub(crate) fn bind_renew_only() -> Bound {
    let document = json!({"Statement": [
        {"Effect": "Allow", "Action": "mqtt:Connect", "Resource": "client:*"},
    ]});
    let policies: Vec<(PolicyRef, Arc<Policy>)> = Policy::from_value(&document)
        .ok()
        .map(|p| {
            vec![(
                PolicyRef {
                    name: RENEW_ONLY_POLICY.into(),
                    version: 1,
                },
                Arc::new(p),
            )]
        })
        .unwrap_or_default();
    portcullis_policy::bind(&policies, &Default::default())
}

/// The name the built-in claim policy is shown with (`explain`, denials).
pub const CLAIM_POLICY: &str = "builtin:claim";

/// The built-in policy of a claim certificate: connect, ask for a device certificate
/// (`CreateKeysAndCertificate`, `CreateCertificateFromCsr`) and register it under `templates`
/// (`RegisterThing`), with their replies — nothing else, whatever else is attached.
pub fn claim_policy(templates: &[String]) -> Option<Policy> {
    let mut topics = Vec::new();
    for format in ["json", "cbor"] {
        topics.push(format!("$aws/certificates/create/{format}"));
        topics.push(format!("$aws/certificates/create-from-csr/{format}"));
        topics.extend(
            templates
                .iter()
                .map(|t| format!("$aws/provisioning-templates/{t}/provision/{format}")),
        );
    }
    let names = |prefix: &str, suffixes: &[&str]| -> Vec<String> {
        topics
            .iter()
            .flat_map(|t| suffixes.iter().map(move |s| format!("{prefix}{t}{s}")))
            .collect()
    };
    let document = json!({"Statement": [
        {"Effect": "Allow", "Action": "mqtt:Connect", "Resource": "client:*"},
        {"Effect": "Allow", "Action": "mqtt:Publish", "Resource": names("topic:", &[""])},
        {"Effect": "Allow", "Action": "mqtt:Subscribe",
         "Resource": names("topicfilter:", &["/accepted", "/rejected"])},
        {"Effect": "Allow", "Action": "mqtt:Receive",
         "Resource": names("topic:", &["/accepted", "/rejected"])},
    ]});
    Policy::from_value(&document).ok()
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// Percent-decodes text to UTF-8; `None` when an escape is malformed or the result is not
/// UTF-8 (or holds a NUL).
pub(crate) fn percent_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().filter(|s| !s.contains('\0'))
}

/// The request path as policies see it: percent-decoded UTF-8. Paths that could mean something
/// else to the upstream than to the policy are refused: an encoded `/` or `\`, `.` or `..`
/// segments (encoded or not), a backslash, invalid UTF-8 or a NUL.
pub(crate) fn policy_path(raw: &str) -> Result<String, &'static str> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or("a malformed percent escape")?;
                if matches!(hex, b'/' | b'\\' | 0) {
                    return Err("an encoded '/', '\\' or NUL");
                }
                out.push(hex);
                i += 3;
            }
            b'\\' => return Err("a backslash"),
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    let decoded = String::from_utf8(out).map_err(|_| "percent escapes that are not UTF-8")?;
    if decoded.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("a '.' or '..' segment");
    }
    // Upstreams that merge slashes or drop `;parameters` would see another path.
    if decoded.contains("//") {
        return Err("an empty segment ('//')");
    }
    if decoded.contains(';') {
        return Err("a ';' (path parameters)");
    }
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_certificate_may_only_provision() {
        let templates = vec!["factory".to_string()];
        let policy = Arc::new(claim_policy(&templates).unwrap());
        let bound = portcullis_policy::bind(
            &[(
                PolicyRef {
                    name: CLAIM_POLICY.into(),
                    version: 1,
                },
                policy,
            )],
            &Variables::new(),
        );
        let decide = |action: &str, resource: &str| {
            bound
                .decide(&PolicyRequest {
                    action,
                    resource,
                    source_ip: None,
                    now: 0,
                })
                .allowed
        };
        assert!(decide("mqtt:Connect", "client:anything"));
        assert!(decide(
            "mqtt:Publish",
            "topic:$aws/certificates/create-from-csr/json"
        ));
        assert!(decide(
            "mqtt:Publish",
            "topic:$aws/provisioning-templates/factory/provision/json"
        ));
        assert!(decide(
            "mqtt:Subscribe",
            "topicfilter:$aws/certificates/create/json/accepted"
        ));
        for (action, resource) in [
            ("mqtt:Publish", "topic:devices/x/telemetry"),
            (
                "mqtt:Publish",
                "topic:$aws/provisioning-templates/other/provision/json",
            ),
            ("mqtt:Subscribe", "topicfilter:#"),
            ("mqtt:Subscribe", "topicfilter:$aws/certificates/#"),
            ("mqtt:Receive", "topic:devices/x"),
            ("http:GET", "/anything"),
        ] {
            assert!(!decide(action, resource), "{action} {resource}");
        }
    }

    #[test]
    fn ambiguous_paths_are_refused_and_the_rest_decoded() {
        assert_eq!(policy_path("/a/b%20c").as_deref(), Ok("/a/b c"));
        assert_eq!(policy_path("/caf%C3%A9").as_deref(), Ok("/café"));
        for bad in [
            "/a/../b",
            "/api//admin",
            "/api/admin;x/y",
            "/api/admin%3bx",
            "/a/%2e%2e/b",
            "/a/%2E/b",
            "/a%2fb",
            "/a%5Cb",
            "/a\\b",
            "/a%zz",
            "/a%ff",
            "/a%00",
            "/..",
        ] {
            assert!(policy_path(bad).is_err(), "{bad}");
        }
    }
}
