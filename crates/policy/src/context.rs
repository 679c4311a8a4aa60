//! A subject's policy context: which policies apply to a certificate (through itself, its
//! things, its CA and the domain) and the variables they are bound with.
//!
//! One definition for every place that asks: the gateway's authorization (from the registry
//! snapshot), MQTT sessions, `explain`, and the admin API's `policy simulate` and certificate
//! view (from the store). What each caller supplies is what the registry knows about the
//! subject ([`Subject`]) and what is attached to a [`Target`]; the order, the deduplication and
//! the variables are decided here.

use std::collections::BTreeMap;

use portcullis_pki::Certificate;

use crate::variables::Variables;

/// What a policy is attached to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A certificate, by id.
    Certificate(String),
    /// A thing, by name.
    Thing(String),
    /// A registered CA, by id: applies to the certificates registered with it.
    Ca(String),
    /// A domain, by hostname: applies to every request on it.
    Domain(String),
}

impl Target {
    /// How the target is named in traces: `certificate <id>`, `thing <name>`, `ca <id>`,
    /// `domain <host>`.
    pub fn describe(&self) -> String {
        match self {
            Target::Certificate(id) => format!("certificate {id}"),
            Target::Thing(name) => format!("thing {name}"),
            Target::Ca(id) => format!("ca {id}"),
            Target::Domain(host) => format!("domain {host}"),
        }
    }
}

/// What the registry knows about a certificate, as policies read it.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// The certificate (its fields are `cert:` variables).
    pub leaf: &'a Certificate,
    /// Its registry id (SHA-256 of the DER, hex).
    pub id: &'a str,
    /// The things it is attached to, with their attributes.
    pub things: &'a [(&'a str, &'a BTreeMap<String, String>)],
    /// The CA it was registered with.
    pub ca: Option<&'a str>,
}

/// Where a subject's policies come from, in order: the certificate, its things, its CA, then
/// the domain. Without a subject (no certificate), only the domain.
pub fn targets(subject: Option<&Subject<'_>>, domain: Option<&str>) -> Vec<Target> {
    let mut targets = match subject {
        Some(s) => certificate_targets(s.id, s.things.iter().map(|(t, _)| *t), s.ca),
        None => Vec::new(),
    };
    if let Some(domain) = domain {
        targets.push(Target::Domain(domain.to_string()));
    }
    targets
}

/// What a certificate's policies can be attached to, in order: the certificate, its things,
/// its CA.
pub fn certificate_targets<'a>(
    id: &str,
    things: impl IntoIterator<Item = &'a str>,
    ca: Option<&str>,
) -> Vec<Target> {
    let mut targets = vec![Target::Certificate(id.to_string())];
    targets.extend(things.into_iter().map(|t| Target::Thing(t.to_string())));
    if let Some(ca) = ca {
        targets.push(Target::Ca(ca.to_string()));
    }
    targets
}

/// The policies that apply, each once (where it is first attached, in [`targets`] order), with
/// what it is attached to: `attached` lists the policy names attached to a target.
pub fn applicable<N: AsRef<str>>(
    targets: &[Target],
    mut attached: impl FnMut(&Target) -> Vec<N>,
) -> Vec<(String, Target)> {
    let mut out: Vec<(String, Target)> = Vec::new();
    for target in targets {
        for name in attached(target) {
            let name = name.as_ref();
            if !out.iter().any(|(n, _)| n == name) {
                out.push((name.to_string(), target.clone()));
            }
        }
    }
    out
}

/// The variables of a subject: the certificate's fields, its things and their attributes, and
/// the MQTT client id (which, as in AWS IoT, picks the thing when the certificate is attached
/// to several). Without a subject, none.
pub fn variables(subject: Option<&Subject<'_>>, client_id: Option<&str>) -> Variables {
    let Some(s) = subject else {
        return Variables::new();
    };
    let mut vars = Variables::from_certificate(s.leaf, s.id);
    vars.set_things(s.things.iter().copied(), client_id);
    if let Some(client_id) = client_id {
        vars.set("mqtt:ClientId", vec![client_id.to_string()]);
    }
    vars
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf() -> Certificate {
        use portcullis_pki::{CaIssuer, IssueRequest, KeyType, PrivateKey, Profile, SubjectName};
        let ca_key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let ca = portcullis_pki::issue::issue(
            &IssueRequest::new(Profile::RootCa, SubjectName::cn("Test CA")),
            &ca_key,
            None,
        )
        .unwrap();
        let issuer = CaIssuer::new(ca, ca_key, Vec::new()).unwrap();
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let req = IssueRequest::new(Profile::Client, SubjectName::cn("pump-1"));
        portcullis_pki::issue::issue(&req, &key, Some(&issuer)).unwrap()
    }

    #[test]
    fn targets_run_certificate_things_ca_domain_and_policies_apply_once() {
        let leaf = leaf();
        let attrs = BTreeMap::from([("site".to_string(), "north".to_string())]);
        let things = [("pump-1", &attrs)];
        let subject = Subject {
            leaf: &leaf,
            id: "abc",
            things: &things,
            ca: Some("ca1"),
        };
        let targets = targets(Some(&subject), Some("api.test"));
        assert_eq!(
            targets,
            vec![
                Target::Certificate("abc".into()),
                Target::Thing("pump-1".into()),
                Target::Ca("ca1".into()),
                Target::Domain("api.test".into()),
            ]
        );
        let applied = applicable(&targets, |t| match t {
            Target::Thing(_) => vec!["shared", "things"],
            Target::Domain(_) => vec!["shared", "domain"],
            _ => vec![],
        });
        let names: Vec<(&str, String)> = applied
            .iter()
            .map(|(n, t)| (n.as_str(), t.describe()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("shared", "thing pump-1".to_string()),
                ("things", "thing pump-1".to_string()),
                ("domain", "domain api.test".to_string()),
            ]
        );
        let vars = variables(Some(&subject), Some("pump-1"));
        assert_eq!(vars.get("mqtt:ClientId"), ["pump-1".to_string()]);
        assert_eq!(vars.get("thing:Attribute.site"), ["north".to_string()]);
        assert!(variables(None, Some("x")).get("mqtt:ClientId").is_empty());
        assert_eq!(
            super::targets(None, Some("d")),
            vec![Target::Domain("d".into())]
        );
    }
}
