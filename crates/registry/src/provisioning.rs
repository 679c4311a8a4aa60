//! Just-in-time provisioning (JITP) templates: how a CA's new certificate becomes a thing.
//!
//! A template names the thing and its attributes from certificate variables, written as in
//! policies (`${cert:Subject.CN}`, or AWS IoT's `${iot:Certificate.Subject.CommonName}`), or in
//! the older template spelling (`${Certificate.Subject.CommonName}`):
//!
//! ```json
//! {"thing_name": "${cert:Subject.CN}",
//!  "attributes": {"site": "${Certificate.Subject.Locality}"}}
//! ```
//!
//! Templates are checked when stored (an unknown variable is refused then, not at a device's
//! first connection) and resolved against each certificate in memory, so the gateway can decide
//! inside the handshake whether a certificate can be provisioned.

use std::collections::BTreeMap;

use portcullis_pki::Certificate;
use portcullis_policy::{Variables, canonical_variable, unknown_variable};
use serde::{Deserialize, Serialize};

use crate::RegistryError;
use crate::names::check_name;

/// A provisioning template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisioningTemplate {
    /// The thing's name, with `${…}` variables.
    pub thing_name: String,
    /// The thing's attributes, values with `${…}` variables.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Attach the certificate exclusively (the default).
    #[serde(default = "exclusive_default")]
    pub exclusive: bool,
    /// Let a new certificate join a thing that already exists with the name the template
    /// makes (a device re-keying). Off by default: a certificate with `CN=sensor-1` would
    /// otherwise inherit an operator-made thing `sensor-1`, its attributes and its policies.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub join_existing_thing: bool,
}

fn exclusive_default() -> bool {
    true
}

/// What a template gives for one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    /// The thing's name.
    pub thing_name: String,
    /// The thing's attributes.
    pub attributes: BTreeMap<String, String>,
    /// Whether the certificate is attached exclusively.
    pub exclusive: bool,
    /// Whether the thing may exist already.
    pub join_existing_thing: bool,
}

impl ProvisioningTemplate {
    /// Parses and checks a template given as JSON.
    pub fn from_json(json: &serde_json::Value) -> Result<ProvisioningTemplate, RegistryError> {
        let template: ProvisioningTemplate = serde_json::from_value(json.clone())
            .map_err(|e| RegistryError::Invalid(format!("provisioning template: {e}")))?;
        template.check()?;
        Ok(template)
    }

    /// Refuses unknown variables, unclosed `${`, and attribute names that are not names.
    pub fn check(&self) -> Result<(), RegistryError> {
        variables(&self.thing_name)?;
        for (key, value) in &self.attributes {
            check_name("attribute", key)?;
            variables(value)?;
        }
        Ok(())
    }

    /// The thing `cert` provisions, or why it cannot (a subject field the template needs is
    /// missing, or the resulting name is not a valid thing name).
    pub fn resolve(&self, cert: &Certificate) -> Result<Provisioned, String> {
        if let Some(why) = cert.subject_ambiguity() {
            return Err(format!(
                "the certificate's subject has {why}, so it names no single thing"
            ));
        }
        let vars = Variables::from_certificate(cert, &cert.info().id);
        let thing_name = substitute(&self.thing_name, cert, &vars)?;
        check_name("thing", &thing_name).map_err(|e| {
            format!(
                "the provisioning template makes an invalid thing name for this certificate: {e}"
            )
        })?;
        let attributes = self
            .attributes
            .iter()
            .map(|(k, v)| Ok((k.clone(), substitute(v, cert, &vars)?)))
            .collect::<Result<_, String>>()?;
        Ok(Provisioned {
            thing_name,
            attributes,
            exclusive: self.exclusive,
            join_existing_thing: self.join_existing_thing,
        })
    }
}

/// What a template variable reads.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Read {
    /// A policy variable of the certificate (`cert:…`).
    Policy(String),
    /// The older template spelling `Certificate.SerialNumber`: hex without colons.
    SerialHex,
}

/// What a variable name in a template reads: a certificate variable under any of its names
/// (ours, AWS IoT's, the older `Certificate.…` spelling); an error for another name.
fn read(name: &str) -> Result<Read, String> {
    if name.starts_with("param:") {
        return Err(format!(
            "${{{name}}} is a fleet provisioning parameter: just-in-time templates read only the certificate"
        ));
    }
    let canonical = match name {
        "Certificate.SerialNumber" => return Ok(Read::SerialHex),
        "Certificate.Id" => Some("cert:Id".to_string()),
        _ => match name.strip_prefix("Certificate.") {
            Some(rest) => canonical_variable(&format!("iot:Certificate.{rest}")),
            None => canonical_variable(name),
        },
    };
    match canonical {
        Some(c) if c.starts_with("cert:") => Ok(Read::Policy(c)),
        Some(_) => Err(format!(
            "provisioning templates read only the certificate: ${{{name}}} has no value while \
             the thing is being made; use a certificate variable such as ${{cert:Subject.CN}}"
        )),
        None => Err(format!(
            "provisioning template: {}",
            unknown_variable(name).replace("unknown variable", "uses the unknown variable")
        )),
    }
}

/// Whether `name` is a certificate variable a template may read.
pub(crate) fn certificate_variable(name: &str) -> Result<(), String> {
    read(name).map(|_| ())
}

/// The value of one certificate variable (any spelling a template accepts), `None` when the
/// certificate lacks the field. A multi-valued variable (a SAN) gives its first value.
pub(crate) fn value(name: &str, cert: &Certificate, vars: &Variables) -> Option<String> {
    match read(name).ok()? {
        Read::SerialHex => Some(cert.info().serial.replace(':', "")),
        Read::Policy(canonical) => vars.get(&canonical).first().cloned(),
    }
}

/// The variables a template string uses, in order; an error for an unknown one or a `${`
/// without its `}`.
fn variables(text: &str) -> Result<Vec<&str>, RegistryError> {
    variables_with(text, |name| read(name).map(|_| ()))
}

/// As [`variables`], with `known` deciding which names a template may use.
pub(crate) fn variables_with(
    text: &str,
    known: impl Fn(&str) -> Result<(), String>,
) -> Result<Vec<&str>, RegistryError> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(RegistryError::Invalid(format!(
                "provisioning template '{text}' opens '${{' without closing it"
            )));
        };
        let name = &after[..end];
        known(name).map_err(RegistryError::Invalid)?;
        out.push(name);
        rest = &after[end + 1..];
    }
    Ok(out)
}

fn substitute(text: &str, cert: &Certificate, vars: &Variables) -> Result<String, String> {
    substitute_with(text, |name| {
        value(name, cert, vars).ok_or_else(|| {
            format!(
                "the provisioning template needs ${{{name}}}, which certificate '{}' lacks",
                cert.info().subject
            )
        })
    })
}

/// `text` with each `${name}` replaced by `lookup(name)` (or its error).
pub(crate) fn substitute_with(
    text: &str,
    lookup: impl Fn(&str) -> Result<String, String>,
) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').unwrap_or(after.len());
        let name = &after[..end];
        out.push_str(&lookup(name)?);
        rest = after.get(end + 1..).unwrap_or("");
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use portcullis_pki::{IssueRequest, KeyType, PrivateKey, Profile, SubjectName};

    fn cert(subject: SubjectName) -> Certificate {
        let ca_key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let ca = portcullis_pki::issue::issue(
            &IssueRequest::new(Profile::RootCa, SubjectName::cn("CA")),
            &ca_key,
            None,
        )
        .unwrap();
        let issuer = portcullis_pki::CaIssuer::new(ca, ca_key, Vec::new()).unwrap();
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        portcullis_pki::issue::issue(
            &IssueRequest::new(Profile::Client, subject),
            &key,
            Some(&issuer),
        )
        .unwrap()
    }

    #[test]
    fn resolves_subject_fields() {
        let t = ProvisioningTemplate::from_json(&serde_json::json!({
            "thing_name": "dev-${Certificate.Subject.CommonName}",
            "attributes": {"id": "${Certificate.Id}"}
        }))
        .unwrap();
        let c = cert(SubjectName::cn("sensor-1"));
        let p = t.resolve(&c).unwrap();
        assert_eq!(p.thing_name, "dev-sensor-1");
        assert_eq!(p.attributes["id"], c.info().id);
        assert!(p.exclusive);
    }

    #[test]
    fn missing_field_is_the_reason() {
        let t = ProvisioningTemplate::from_json(&serde_json::json!({
            "thing_name": "${Certificate.Subject.Organization}"
        }))
        .unwrap();
        let e = t.resolve(&cert(SubjectName::cn("x"))).unwrap_err();
        assert!(e.contains("Certificate.Subject.Organization"), "{e}");
    }

    #[test]
    fn unknown_variables_and_bad_names_are_refused_when_stored() {
        for bad in [
            serde_json::json!({"thing_name": "${Certificate.Subject.Nope}"}),
            serde_json::json!({"thing_name": "${Certificate.Id"}),
            serde_json::json!({"thing_name": "x", "attributes": {"a b": "c"}}),
            serde_json::json!({"thing": "x"}),
        ] {
            assert!(ProvisioningTemplate::from_json(&bad).is_err(), "{bad}");
        }
        let spaces = ProvisioningTemplate::from_json(&serde_json::json!({
            "thing_name": "${Certificate.Subject.CommonName}"
        }))
        .unwrap();
        assert!(spaces.resolve(&cert(SubjectName::cn("a b"))).is_err());
    }

    #[test]
    fn templates_read_the_policy_names_too() {
        let c = cert(SubjectName {
            organization: Some("acme".into()),
            ..SubjectName::cn("sensor-1")
        });
        let t = ProvisioningTemplate::from_json(&serde_json::json!({
            "thing_name": "${cert:Subject.CN}",
            "attributes": {
                "aws": "${iot:Certificate.Subject.Organization}",
                "old": "${Certificate.Subject.Organization}",
                "ours": "${cert:Subject.O}",
                "serial": "${Certificate.SerialNumber}",
                "issuer": "${cert:Issuer.CN}"
            }
        }))
        .unwrap();
        let p = t.resolve(&c).unwrap();
        assert_eq!(p.thing_name, "sensor-1");
        for key in ["aws", "old", "ours"] {
            assert_eq!(p.attributes[key], "acme", "{key}");
        }
        assert_eq!(p.attributes["serial"], c.info().serial.replace(':', ""));
        assert_eq!(p.attributes["issuer"], "CA");
        for (bad, says) in [
            ("${thing:Name}", "read only the certificate"),
            ("${iot:ClientId}", "read only the certificate"),
            ("${iot:Certificate.Validity.NotAfter}", "has no counterpart"),
            ("${cert:Subject.Nope}", "unknown variable"),
        ] {
            let e = ProvisioningTemplate::from_json(&serde_json::json!({"thing_name": bad}))
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
