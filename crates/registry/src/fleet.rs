//! Fleet provisioning templates: how a device holding a claim certificate becomes a thing with
//! its own certificate (IoT Core's "provisioning by claim").
//!
//! The language is the just-in-time templates' ([`crate::provisioning`]) — certificate variables
//! of the *new* certificate (`${cert:Subject.CN}`, `${cert:Id}`, AWS IoT's spellings) — extended
//! with the parameters the device sends in `RegisterThing` (`${param:SerialNumber}`), and with
//! what to create: the policies attached to the thing, the certificate's status, and the
//! `deviceConfiguration` answered to the device.
//!
//! ```json
//! {"thing_name": "sensor-${param:SerialNumber}",
//!  "attributes": {"serial": "${param:SerialNumber}", "model": "${param:Model}"},
//!  "parameters": {"SerialNumber": {"max_length": 32}, "Model": {"default": "m1"}},
//!  "policies": ["devices"],
//!  "device_configuration": {"Fallback": "https://example.com"}}
//! ```
//!
//! A template is checked when stored (unknown variables, undeclared parameters, names); a
//! request's parameters are checked against it (declared, present unless defaulted, no
//! separators or wildcards that policies would read, within their length).

use std::collections::BTreeMap;

use portcullis_pki::Certificate;
use portcullis_policy::Variables;
use serde::{Deserialize, Serialize};

use crate::RegistryError;
use crate::model::CertStatus;
use crate::names::check_name;
use crate::provisioning::{certificate_variable, substitute_with, value, variables_with};

/// A fleet provisioning template's document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetTemplate {
    /// The thing's name, with `${…}` variables.
    pub thing_name: String,
    /// The thing's attributes, values with `${…}` variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// The parameters a device may send, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, Parameter>,
    /// Policies attached to the thing (they must exist when a device registers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// The certificate's status once registered: `ACTIVE` (the default) or `INACTIVE`.
    #[serde(default = "active", skip_serializing_if = "is_active")]
    pub certificate_status: String,
    /// Answered to the device as `deviceConfiguration` (values as text, as IoT Core does).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub device_configuration: BTreeMap<String, String>,
    /// Attach the certificate exclusively (the default).
    #[serde(default = "yes")]
    pub exclusive: bool,
    /// Let the certificate join a thing that exists already with the name the template makes
    /// (a device provisioned again). Off by default: a device could otherwise take over
    /// another thing, its attributes and its policies, by sending its parameters.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub join_existing_thing: bool,
    /// A webhook (by name) asked before each registration: it answers
    /// `{"allowProvisioning": true|false, "parameterOverrides": {…}}` within 5 s, or the device
    /// is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_provisioning_hook: Option<String>,
    /// How the certificates it provisions renew (fixed on each when it is registered, and
    /// inherited by its renewals).
    #[serde(default, skip_serializing_if = "RenewalSettings::is_default")]
    pub renewal: RenewalSettings,
}

/// How a template's certificates renew.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewalSettings {
    /// When a certificate is due for renewal, in percent of its lifetime (1-99; default 67,
    /// two thirds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_after_percent: Option<u8>,
    /// Refuse a device's renewal before it is due (off: a device may renew at any time).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refuse_early: bool,
    /// Days after expiry during which an expired certificate may still renew — and do nothing
    /// else (0, the default: an expired certificate is refused like any other).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub grace_days: u32,
    /// Hours after a renewal is issued when the certificate it renews becomes INACTIVE even if
    /// the renewal was never seen on a connection (default: only once it is seen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap_hours: Option<u32>,
    /// Require a new key on renewal (rekey); off by default: the same key may renew.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_new_key: bool,
}

impl RenewalSettings {
    fn is_default(&self) -> bool {
        *self == RenewalSettings::default()
    }

    /// The due point in percent of the lifetime.
    pub fn due_percent(&self) -> i64 {
        i64::from(self.due_after_percent.unwrap_or(67))
    }

    fn check(&self) -> Result<(), RegistryError> {
        let bad = |what: &str| {
            Err(RegistryError::Invalid(format!(
                "provisioning template: renewal.{what}"
            )))
        };
        if self
            .due_after_percent
            .is_some_and(|p| !(1..=99).contains(&p))
        {
            return bad("due_after_percent must be 1-99");
        }
        if self.grace_days > 365 {
            return bad("grace_days must be at most 365");
        }
        if self.overlap_hours.is_some_and(|h| h == 0 || h > 8760) {
            return bad("overlap_hours must be 1-8760");
        }
        Ok(())
    }
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// A parameter a device may send.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Parameter {
    /// Its value when the device sends none; without a default, the parameter is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// The longest value accepted (default 128).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
}

fn active() -> String {
    "ACTIVE".into()
}

fn is_active(s: &String) -> bool {
    s == "ACTIVE"
}

fn yes() -> bool {
    true
}

/// Characters a parameter value may not hold: policies read them as separators or wildcards,
/// and template variables start with `$`.
const FORBIDDEN: &[char] = &['/', '+', '#', '*', '?', '$', '{', '}'];

/// What a template makes for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetPlan {
    /// The thing's name.
    pub thing_name: String,
    /// Its attributes.
    pub attributes: BTreeMap<String, String>,
    /// Policies attached to the thing.
    pub policies: Vec<String>,
    /// The certificate's status.
    pub status: CertStatus,
    /// Exclusive attachment.
    pub exclusive: bool,
    /// Whether the thing may exist already.
    pub join_existing_thing: bool,
    /// The device configuration answered.
    pub device_configuration: BTreeMap<String, String>,
    /// How the certificate renews.
    pub renewal: RenewalSettings,
    /// The template's name (set by whoever names it: the plan does not know it).
    pub template: Option<String>,
}

impl FleetTemplate {
    /// Parses and checks a template given as JSON.
    pub fn from_json(json: &serde_json::Value) -> Result<FleetTemplate, RegistryError> {
        let template: FleetTemplate = serde_json::from_value(json.clone())
            .map_err(|e| RegistryError::Invalid(format!("provisioning template: {e}")))?;
        template.check()?;
        Ok(template)
    }

    /// Refuses unknown variables, parameters used but not declared, bad names and statuses.
    pub fn check(&self) -> Result<(), RegistryError> {
        for name in self.parameters.keys() {
            check_name("parameter", name)?;
        }
        let known = |name: &str| match name.strip_prefix("param:") {
            Some(p) if self.parameters.contains_key(p) => Ok(()),
            Some(p) => Err(format!(
                "provisioning template: ${{param:{p}}} is used but not declared in \"parameters\""
            )),
            None => certificate_variable(name),
        };
        variables_with(&self.thing_name, known)?;
        for (key, value) in &self.attributes {
            check_name("attribute", key)?;
            variables_with(value, known)?;
        }
        for policy in &self.policies {
            check_name("policy", policy)?;
        }
        for key in self.device_configuration.keys() {
            check_name("device configuration key", key)?;
        }
        if let Some(hook) = &self.pre_provisioning_hook {
            check_name("webhook", hook)?;
        }
        self.status()?;
        self.renewal.check()?;
        Ok(())
    }

    fn status(&self) -> Result<CertStatus, RegistryError> {
        match self.certificate_status.as_str() {
            "ACTIVE" => Ok(CertStatus::Active),
            "INACTIVE" => Ok(CertStatus::Inactive),
            other => Err(RegistryError::Invalid(format!(
                "provisioning template: certificate_status '{other}' must be ACTIVE or INACTIVE"
            ))),
        }
    }

    /// What the template makes for `cert` (the device's new certificate) and the parameters
    /// the device sent; the reason, in the device's terms, when it cannot.
    pub fn plan(
        &self,
        cert: &Certificate,
        sent: &BTreeMap<String, String>,
    ) -> Result<FleetPlan, String> {
        let mut params = BTreeMap::new();
        for name in sent.keys() {
            if !self.parameters.contains_key(name) {
                return Err(format!(
                    "the parameter '{name}' is not one the template declares"
                ));
            }
        }
        for (name, spec) in &self.parameters {
            let value = match (sent.get(name), &spec.default) {
                (Some(v), _) => v.clone(),
                (None, Some(d)) => d.clone(),
                (None, None) => return Err(format!("the parameter '{name}' is required")),
            };
            let max = spec.max_length.unwrap_or(128);
            if value.is_empty() || value.chars().count() > max {
                return Err(format!("the parameter '{name}' must be 1-{max} characters"));
            }
            if let Some(c) = value
                .chars()
                .find(|c| FORBIDDEN.contains(c) || c.is_control())
            {
                return Err(format!(
                    "the parameter '{name}' holds {c:?}, which is not allowed (policies read / + # * ? $ as separators or wildcards)"
                ));
            }
            params.insert(name.clone(), value);
        }
        let vars = Variables::from_certificate(cert, &cert.info().id);
        let lookup = |name: &str| match name.strip_prefix("param:") {
            Some(p) => params
                .get(p)
                .cloned()
                .ok_or_else(|| format!("the parameter '{p}' is missing")),
            None => value(name, cert, &vars).ok_or_else(|| {
                format!("the template needs ${{{name}}}, which the new certificate lacks")
            }),
        };
        let thing_name = substitute_with(&self.thing_name, lookup)?;
        check_name("thing", &thing_name)
            .map_err(|e| format!("the template makes an invalid thing name: {e}"))?;
        let attributes = self
            .attributes
            .iter()
            .map(|(k, v)| Ok((k.clone(), substitute_with(v, lookup)?)))
            .collect::<Result<_, String>>()?;
        Ok(FleetPlan {
            thing_name,
            attributes,
            policies: self.policies.clone(),
            status: self.status().map_err(|e| e.to_string())?,
            exclusive: self.exclusive,
            join_existing_thing: self.join_existing_thing,
            device_configuration: self.device_configuration.clone(),
            renewal: self.renewal,
            template: None,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use portcullis_pki::{IssueRequest, KeyType, PrivateKey, Profile, SubjectName};

    fn cert(cn: &str) -> Certificate {
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
            &IssueRequest::new(Profile::Client, SubjectName::cn(cn)),
            &key,
            Some(&issuer),
        )
        .unwrap()
    }

    fn template() -> FleetTemplate {
        FleetTemplate::from_json(&serde_json::json!({
            "thing_name": "sensor-${param:SerialNumber}",
            "attributes": {"model": "${param:Model}", "cn": "${cert:Subject.CN}"},
            "parameters": {"SerialNumber": {"max_length": 8}, "Model": {"default": "m1"}},
            "policies": ["devices"],
            "device_configuration": {"Fallback": "https://example.com"}
        }))
        .unwrap()
    }

    #[test]
    fn parameters_and_certificate_variables_make_the_thing() {
        let sent = BTreeMap::from([("SerialNumber".to_string(), "A123".to_string())]);
        let plan = template().plan(&cert("dev"), &sent).unwrap();
        assert_eq!(plan.thing_name, "sensor-A123");
        assert_eq!(plan.attributes["model"], "m1");
        assert_eq!(plan.attributes["cn"], "dev");
        assert_eq!(plan.status, CertStatus::Active);
        assert_eq!(plan.policies, ["devices"]);
    }

    #[test]
    fn bad_parameters_are_refused_with_their_name() {
        let t = template();
        let c = cert("dev");
        for (sent, says) in [
            (vec![], "'SerialNumber' is required"),
            (vec![("SerialNumber", "A/1")], "not allowed"),
            (vec![("SerialNumber", "a+b")], "not allowed"),
            (vec![("SerialNumber", "123456789")], "1-8 characters"),
            (vec![("SerialNumber", "1"), ("Other", "x")], "'Other'"),
        ] {
            let sent = sent
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let e = t.plan(&c, &sent).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn templates_are_checked_when_stored() {
        for (bad, says) in [
            (
                serde_json::json!({"thing_name": "${param:Nope}"}),
                "not declared",
            ),
            (
                serde_json::json!({"thing_name": "${cert:Nope}"}),
                "unknown variable",
            ),
            (
                serde_json::json!({"thing_name": "x", "certificate_status": "REVOKED"}),
                "ACTIVE or INACTIVE",
            ),
            (
                serde_json::json!({"thing_name": "x", "policies": ["a b"]}),
                "policy name",
            ),
            (serde_json::json!({"thing": "x"}), "unknown field"),
        ] {
            let e = FleetTemplate::from_json(&bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
