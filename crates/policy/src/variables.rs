//! Policy variables: the names a policy may use as `${name}`, the values a connection gives
//! them, and the substitution that turns a pattern with variables into plain patterns.

use std::collections::BTreeMap;

use portcullis_pki::Certificate;
use serde::Serialize;

/// The certificate name attributes policies read, as `cert:Subject.<short>` and
/// `cert:Issuer.<short>`: (short name, AWS IoT's name). The AWS name also works as
/// `iot:Certificate.Subject.<Name>` (or `.Issuer.`), with or without `.List`.
pub const NAME_ATTRIBUTES: [(&str, &str); 15] = [
    ("CN", "CommonName"),
    ("O", "Organization"),
    ("OU", "OrganizationalUnit"),
    ("C", "Country"),
    ("ST", "State"),
    ("L", "Locality"),
    ("serialNumber", "SerialNumber"),
    ("dnQualifier", "DistinguishedNameQualifier"),
    ("title", "Title"),
    ("SN", "Surname"),
    ("GN", "GivenName"),
    ("initials", "Initials"),
    ("pseudonym", "Pseudonym"),
    ("generationQualifier", "GenerationQualifier"),
    ("emailAddress", "EmailAddress"),
];

/// The variable names besides `cert:Subject.<short>`, `cert:Issuer.<short>` and
/// `thing:Attribute.<key>` (key: 1–128 of `A-Z a-z 0-9 _ - . :`).
pub const VARIABLE_NAMES: &[&str] = &[
    "cert:SerialNumber",
    "cert:Id",
    "cert:SAN.DNS",
    "cert:SAN.URI",
    "cert:SAN.Email",
    "cert:SAN.IP",
    "thing:Name",
    "thing:IsAttached",
    "mqtt:ClientId",
];

/// What the variables are, for error messages.
pub const VARIABLES_ARE: &str = "variables are cert:Subject.<attr> and cert:Issuer.<attr> (attr: \
     CN, O, OU, C, ST, L, serialNumber, dnQualifier, title, SN, GN, initials, pseudonym, \
     generationQualifier, emailAddress), cert:SerialNumber, cert:Id, cert:SAN.DNS, cert:SAN.URI, \
     cert:SAN.Email, cert:SAN.IP, thing:Name, thing:IsAttached, thing:Attribute.<key>, \
     mqtt:ClientId, or AWS IoT's names for them (iot:ClientId, iot:CertificateId, \
     iot:Certificate.Subject.CommonName, iot:Connection.Thing.ThingName, \
     iot:Connection.Thing.Attributes[<key>]…); names are case-sensitive";

/// AWS IoT's names for the subject alternative names, and ours.
const AWS_ALTERNATIVE_NAMES: [(&str, &str); 4] = [
    ("DNSName", "cert:SAN.DNS"),
    ("UniformResourceIdentifier", "cert:SAN.URI"),
    ("RFC822Name", "cert:SAN.Email"),
    ("IPAddress", "cert:SAN.IP"),
];

const THING_ATTRIBUTE: &str = "thing:Attribute.";

/// Most patterns one pattern may expand into when its variables have several values; beyond
/// this the pattern matches nothing (never everything).
pub const MAX_EXPANSION: usize = 256;

/// True for a name a policy may use as `${name}` or as a condition key: ours, or AWS IoT's
/// name for one of ours.
pub fn is_variable_name(name: &str) -> bool {
    canonical_variable(name).is_some()
}

/// The name `name` stands for: itself when it is one of ours, ours when it is AWS IoT's name
/// for a variable (`iot:ClientId` is `mqtt:ClientId`, `iot:Certificate.Subject.CommonName` is
/// `cert:Subject.CN`, `iot:Connection.Thing.Attributes[site]` is `thing:Attribute.site`), so
/// that a policy copied from IoT Core works unchanged. `None` for an unknown name.
pub fn canonical_variable(name: &str) -> Option<String> {
    if VARIABLE_NAMES.contains(&name) {
        return Some(name.to_string());
    }
    if let Some(key) = name.strip_prefix(THING_ATTRIBUTE) {
        return is_attribute_key(key).then(|| name.to_string());
    }
    for prefix in ["cert:Subject.", "cert:Issuer."] {
        if let Some(short) = name.strip_prefix(prefix) {
            return NAME_ATTRIBUTES
                .iter()
                .any(|(s, _)| *s == short)
                .then(|| name.to_string());
        }
    }
    aws_alias(name).map(str::to_string).or_else(|| {
        if let Some(key) = name
            .strip_prefix("iot:Connection.Thing.Attributes[")
            .and_then(|k| k.strip_suffix(']'))
        {
            return is_attribute_key(key).then(|| format!("{THING_ATTRIBUTE}{key}"));
        }
        let rest = name.strip_prefix("iot:Certificate.")?;
        let rest = rest.strip_suffix(".List").unwrap_or(rest);
        if let Some(alt) = rest.strip_prefix("Subject.AlternativeName.") {
            return AWS_ALTERNATIVE_NAMES
                .iter()
                .find(|(aws, _)| *aws == alt)
                .map(|(_, ours)| ours.to_string());
        }
        let (part, long) = rest.split_once('.')?;
        if part != "Subject" && part != "Issuer" {
            return None;
        }
        let (short, _) = NAME_ATTRIBUTES.iter().find(|(_, l)| *l == long)?;
        Some(format!("cert:{part}.{short}"))
    })
}

/// AWS IoT's fixed names for our variables.
fn aws_alias(name: &str) -> Option<&'static str> {
    Some(match name {
        "iot:ClientId" => "mqtt:ClientId",
        "iot:CertificateId" => "cert:Id",
        "iot:Certificate.SerialNumber" => "cert:SerialNumber",
        "iot:Connection.Thing.ThingName" => "thing:Name",
        "iot:Connection.Thing.IsAttached" => "thing:IsAttached",
        _ => return None,
    })
}

/// Why an unknown variable name is unknown, with what to write instead.
pub fn unknown_variable(name: &str) -> String {
    if name == "iot:Connection.Thing.ThingTypeName" {
        return format!(
            "${{{name}}} has no counterpart: things here have no type; use a thing attribute \
             (${{thing:Attribute.type}}) instead"
        );
    }
    if name.starts_with("iot:") || name.starts_with("aws:") {
        return format!("AWS IoT's ${{{name}}} has no counterpart here; {VARIABLES_ARE}");
    }
    format!("unknown variable ${{{name}}}; {VARIABLES_ARE}")
}

fn is_attribute_key(key: &str) -> bool {
    (1..=128).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b))
}

/// The values of the variables for one connection: each name has a list of values (a
/// certificate has several DNS names, a certificate may be attached to several things).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Variables {
    values: BTreeMap<String, Vec<String>>,
    /// Why the certificate's subject cannot be read as one identity (a repeated attribute, a
    /// multi-valued RDN, a value that is not text): policies then refuse everything.
    #[serde(skip)]
    ambiguous: Option<String>,
}

impl Variables {
    /// No variable has a value.
    pub fn new() -> Variables {
        Variables::default()
    }

    /// Sets the values of `name`, replacing earlier ones. An empty list removes the variable.
    pub fn set(&mut self, name: &str, values: Vec<String>) {
        if values.is_empty() {
            self.values.remove(name);
        } else {
            self.values.insert(name.to_string(), values);
        }
    }

    /// The values of `name`; empty when it has none.
    pub fn get(&self, name: &str) -> &[String] {
        self.values.get(name).map_or(&[], Vec::as_slice)
    }

    /// Why these variables cannot stand for one identity, when the certificate's subject is
    /// ambiguous: every decision bound to them is a refusal saying so.
    pub fn ambiguity(&self) -> Option<&str> {
        self.ambiguous.as_deref()
    }

    /// Every variable with its values, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.values.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// The `cert:` variables of a client certificate whose registry id is `id` (64 hex). Fields
    /// the certificate lacks get no value. The `thing:` and `mqtt:` variables are the caller's
    /// to set.
    pub fn from_certificate(cert: &Certificate, id: &str) -> Variables {
        let mut vars = Variables::new();
        vars.ambiguous = cert.subject_ambiguity().map(str::to_string);
        let names = cert.name_attributes();
        for (short, _) in NAME_ATTRIBUTES {
            if let Some(value) = names.subject(short) {
                vars.set(&format!("cert:Subject.{short}"), vec![value.to_string()]);
            }
            if let Some(value) = names.issuer(short) {
                vars.set(&format!("cert:Issuer.{short}"), vec![value.to_string()]);
            }
        }
        vars.set("cert:SerialNumber", vec![cert.info().serial.clone()]);
        vars.set("cert:Id", vec![id.to_string()]);
        for (name, prefix) in [
            ("cert:SAN.DNS", "dns:"),
            ("cert:SAN.URI", "uri:"),
            ("cert:SAN.Email", "email:"),
            ("cert:SAN.IP", "ip:"),
        ] {
            let values = cert
                .info()
                .subject_alt_names
                .iter()
                .filter_map(|san| san.strip_prefix(prefix))
                .map(str::to_string)
                .collect();
            vars.set(name, values);
        }
        vars
    }

    /// Sets the `thing:` variables from the things the certificate is attached to, each with
    /// its attributes. As in AWS IoT, when the certificate is attached to several things and
    /// the connection has a client id (MQTT), only the thing named like the client id counts
    /// (none, if no thing is): a device reads its own thing's name and attributes, not its
    /// siblings'. `thing:IsAttached` is `true` when a thing counts, `false` otherwise.
    pub fn set_things<'a>(
        &mut self,
        things: impl IntoIterator<Item = (&'a str, &'a BTreeMap<String, String>)>,
        client_id: Option<&str>,
    ) {
        let mut things: Vec<(&str, &BTreeMap<String, String>)> = things.into_iter().collect();
        if things.len() > 1
            && let Some(client_id) = client_id
        {
            things.retain(|(name, _)| *name == client_id);
        }
        let mut attributes: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (_, attrs) in &things {
            for (key, value) in attrs.iter() {
                attributes
                    .entry(format!("{THING_ATTRIBUTE}{key}"))
                    .or_default()
                    .push(value.clone());
            }
        }
        self.set(
            "thing:Name",
            things.iter().map(|(name, _)| name.to_string()).collect(),
        );
        self.set("thing:IsAttached", vec![(!things.is_empty()).to_string()]);
        for (key, values) in attributes {
            self.set(&key, values);
        }
    }
}

/// A string with `${name}` variables, checked when the policy is parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    text: String,
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Variable(String),
}

/// What a template gives for one set of variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Expansion {
    /// The plain strings, at least one.
    Values(Vec<String>),
    /// Nothing, and why: a variable without a usable value, or too many combinations.
    Nothing(String),
}

impl Template {
    /// Splits `text` into literals and variables; the error says what is wrong with a `${…}`.
    pub(crate) fn parse(text: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                pieces.push(Piece::Literal(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                return Err(
                    "'${' is not closed; write a variable as ${name}, for example \
                     ${cert:Subject.CN}"
                        .to_string(),
                );
            };
            let name = &after[..end];
            if name.is_empty() {
                return Err(
                    "empty variable ${}; name one, for example ${cert:Subject.CN}".to_string(),
                );
            }
            let Some(canonical) = canonical_variable(name) else {
                return Err(unknown_variable(name));
            };
            pieces.push(Piece::Variable(canonical));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Literal(rest.to_string()));
        }
        Ok(Template {
            text: text.to_string(),
            pieces,
        })
    }

    /// The text as written in the policy.
    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    /// Substitutes `vars` into a condition value: a value that is empty or holds `*` or `?` is
    /// not usable. See [`Template::expand_with`].
    pub(crate) fn expand(&self, vars: &Variables) -> Expansion {
        self.expand_with(vars, &['*', '?'])
    }

    /// Substitutes `vars` into a Resource pattern. Besides wildcards, a value may not hold the
    /// resource's separators, or it would reach into another device's or tenant's space: `/`
    /// in every resource (`route:a.test/partners/${cert:Subject.O}/*` with `O = "Acme/x"`), and
    /// MQTT's wildcards and `$` in topics and filters (`topicfilter:t/${mqtt:ClientId}/#` with
    /// the client id `+`).
    pub(crate) fn expand_resource(&self, vars: &Variables) -> Expansion {
        let kind = self
            .text
            .split_once(':')
            .map(|(kind, _)| kind)
            .filter(|kind| !kind.contains('$'));
        match kind {
            Some("route" | "client") => self.expand_with(vars, &['*', '?', '/']),
            _ => self.expand_with(vars, &['*', '?', '/', '+', '#', '$']),
        }
    }

    /// Substitutes `vars`. A variable takes each of its usable values in turn (the same value
    /// wherever it appears in the template); several multi-valued variables give every
    /// combination. A value that is empty or holds one of `forbidden` is not usable:
    /// substitution must never widen a pattern.
    fn expand_with(&self, vars: &Variables, forbidden: &[char]) -> Expansion {
        let mut names: Vec<&str> = Vec::new();
        for piece in &self.pieces {
            if let Piece::Variable(name) = piece
                && !names.contains(&name.as_str())
            {
                names.push(name);
            }
        }
        if names.is_empty() {
            return Expansion::Values(vec![self.text.clone()]);
        }
        let mut choices: Vec<Vec<&str>> = Vec::with_capacity(names.len());
        let mut combinations: usize = 1;
        for name in &names {
            let mut usable: Vec<&str> = Vec::new();
            for value in vars.get(name) {
                if !value.is_empty()
                    && !value.contains(forbidden)
                    && !usable.contains(&value.as_str())
                {
                    usable.push(value);
                }
            }
            if usable.is_empty() {
                let held: String = forbidden.iter().map(|c| format!(" {c}")).collect();
                return Expansion::Nothing(format!(
                    "${{{name}}} has no usable value (none, empty, or holding one of{held})"
                ));
            }
            combinations = combinations.saturating_mul(usable.len());
            choices.push(usable);
        }
        if combinations > MAX_EXPANSION {
            return Expansion::Nothing(format!(
                "'{}' expands to {combinations} patterns, more than the {MAX_EXPANSION} allowed",
                self.text
            ));
        }
        let mut out = Vec::with_capacity(combinations);
        // An odometer over the choices: pick[i] indexes choices[i].
        let mut pick = vec![0usize; names.len()];
        loop {
            let mut s = String::new();
            for piece in &self.pieces {
                match piece {
                    Piece::Literal(text) => s.push_str(text),
                    Piece::Variable(name) => {
                        if let Some(i) = names.iter().position(|n| n == name) {
                            s.push_str(choices[i][pick[i]]);
                        }
                    }
                }
            }
            out.push(s);
            let mut i = 0;
            loop {
                if i == pick.len() {
                    return Expansion::Values(out);
                }
                pick[i] += 1;
                if pick[i] < choices[i].len() {
                    break;
                }
                pick[i] = 0;
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &[&str])]) -> Variables {
        let mut v = Variables::new();
        for (name, values) in pairs {
            v.set(name, values.iter().map(|s| s.to_string()).collect());
        }
        v
    }

    fn values(e: Expansion) -> Vec<String> {
        match e {
            Expansion::Values(v) => v,
            Expansion::Nothing(why) => panic!("expected values, got nothing: {why}"),
        }
    }

    #[test]
    fn variable_names() {
        assert!(is_variable_name("cert:Subject.CN"));
        assert!(is_variable_name("thing:Attribute.site"));
        assert!(is_variable_name("thing:Attribute.a-b_c.d:e9"));
        assert!(is_variable_name(&format!(
            "thing:Attribute.{}",
            "k".repeat(128)
        )));
        assert!(!is_variable_name(&format!(
            "thing:Attribute.{}",
            "k".repeat(129)
        )));
        assert!(!is_variable_name("thing:Attribute."));
        assert!(!is_variable_name("thing:Attribute.a b"));
        assert!(!is_variable_name("cert:subject.cn"));
        assert!(!is_variable_name("conn:SourceIp"));
    }

    #[test]
    fn aws_iot_names_are_ours() {
        for (aws, ours) in [
            ("iot:ClientId", "mqtt:ClientId"),
            ("iot:CertificateId", "cert:Id"),
            ("iot:Certificate.SerialNumber", "cert:SerialNumber"),
            ("iot:Certificate.Subject.CommonName", "cert:Subject.CN"),
            (
                "iot:Certificate.Subject.Organization.List",
                "cert:Subject.O",
            ),
            (
                "iot:Certificate.Subject.OrganizationalUnit",
                "cert:Subject.OU",
            ),
            (
                "iot:Certificate.Subject.DistinguishedNameQualifier",
                "cert:Subject.dnQualifier",
            ),
            (
                "iot:Certificate.Subject.SerialNumber",
                "cert:Subject.serialNumber",
            ),
            ("iot:Certificate.Issuer.CommonName", "cert:Issuer.CN"),
            (
                "iot:Certificate.Issuer.GenerationQualifier",
                "cert:Issuer.generationQualifier",
            ),
            (
                "iot:Certificate.Subject.AlternativeName.DNSName",
                "cert:SAN.DNS",
            ),
            (
                "iot:Certificate.Subject.AlternativeName.RFC822Name.List",
                "cert:SAN.Email",
            ),
            (
                "iot:Certificate.Subject.AlternativeName.IPAddress",
                "cert:SAN.IP",
            ),
            ("iot:Connection.Thing.ThingName", "thing:Name"),
            ("iot:Connection.Thing.IsAttached", "thing:IsAttached"),
            (
                "iot:Connection.Thing.Attributes[site]",
                "thing:Attribute.site",
            ),
            ("cert:Subject.ST", "cert:Subject.ST"),
            ("thing:Attribute.a.b", "thing:Attribute.a.b"),
        ] {
            assert_eq!(canonical_variable(aws).as_deref(), Some(ours), "{aws}");
        }
        for unknown in [
            "iot:Certificate.Subject.Nope",
            "iot:Certificate.Validity.NotBefore",
            "iot:Certificate.Other.CommonName",
            "iot:Connection.Thing.Attributes[a b]",
            "iot:Connection.Thing.Attributes[]",
            "iot:Connection.Thing.ThingTypeName",
            "iot:clientid",
            "cert:Subject.CommonName",
            "Certificate.Subject.CommonName",
        ] {
            assert_eq!(canonical_variable(unknown), None, "{unknown}");
        }
        // A template keeps the name as written and reads ours.
        let t = Template::parse("t/${iot:Certificate.Subject.CommonName}").unwrap();
        assert_eq!(t.text(), "t/${iot:Certificate.Subject.CommonName}");
        assert_eq!(
            values(t.expand(&vars(&[("cert:Subject.CN", &["s1"])]))),
            ["t/s1"]
        );
    }

    #[test]
    fn things_follow_the_client_id_when_there_are_several() {
        let a: BTreeMap<String, String> = [("site".to_string(), "lyon".to_string())].into();
        let b: BTreeMap<String, String> = [("site".to_string(), "oslo".to_string())].into();
        let both = || [("pump-a", &a), ("pump-b", &b)];
        let mut v = Variables::new();
        v.set_things(both(), None);
        assert_eq!(v.get("thing:Name"), ["pump-a", "pump-b"]);
        assert_eq!(v.get("thing:Attribute.site"), ["lyon", "oslo"]);
        assert_eq!(v.get("thing:IsAttached"), ["true"]);
        let mut v = Variables::new();
        v.set_things(both(), Some("pump-b"));
        assert_eq!(v.get("thing:Name"), ["pump-b"]);
        assert_eq!(v.get("thing:Attribute.site"), ["oslo"]);
        let mut v = Variables::new();
        v.set_things(both(), Some("intruder"));
        assert!(v.get("thing:Name").is_empty());
        assert!(v.get("thing:Attribute.site").is_empty());
        assert_eq!(v.get("thing:IsAttached"), ["false"]);
        // One thing: the certificate says which, whatever the client id.
        let mut v = Variables::new();
        v.set_things([("pump-a", &a)], Some("other"));
        assert_eq!(v.get("thing:Name"), ["pump-a"]);
        let mut v = Variables::new();
        v.set_things(std::iter::empty(), None);
        assert_eq!(v.get("thing:IsAttached"), ["false"]);
    }

    #[test]
    fn templates_refuse_bad_variables() {
        assert!(
            Template::parse("a${cert:Subject.CN")
                .unwrap_err()
                .contains("not closed")
        );
        assert!(
            Template::parse("a${}b")
                .unwrap_err()
                .contains("empty variable")
        );
        let e = Template::parse("${cert:Subject.XX}").unwrap_err();
        assert!(e.contains("unknown variable ${cert:Subject.XX}"), "{e}");
        assert!(e.contains("cert:Subject.<attr>"), "{e}");
        let e = Template::parse("${iot:Certificate.Validity.NotAfter}").unwrap_err();
        assert!(
            e.starts_with("AWS IoT's ${iot:Certificate.Validity.NotAfter} has no"),
            "{e}"
        );
        assert!(Template::parse("plain $ and } and {").is_ok());
    }

    #[test]
    fn expansion_substitutes_and_multiplies() {
        let t = Template::parse("x/${thing:Name}/${cert:SAN.DNS}/${thing:Name}").unwrap();
        let v = vars(&[
            ("thing:Name", &["t1", "t2"]),
            ("cert:SAN.DNS", &["a", "b", "c"]),
        ]);
        let mut got = values(t.expand(&v));
        got.sort();
        assert_eq!(got.len(), 6);
        assert_eq!(got[0], "x/t1/a/t1");
        assert_eq!(got[5], "x/t2/c/t2");
        assert_eq!(
            values(Template::parse("plain*").unwrap().expand(&v)),
            ["plain*"]
        );
    }

    #[test]
    fn values_that_could_widen_are_dropped() {
        let t = Template::parse("p/${cert:Subject.CN}").unwrap();
        for bad in ["*", "a?", "", "x*y"] {
            assert!(
                matches!(
                    t.expand(&vars(&[("cert:Subject.CN", &[bad])])),
                    Expansion::Nothing(_)
                ),
                "{bad:?}"
            );
        }
        assert_eq!(
            values(t.expand(&vars(&[("cert:Subject.CN", &["*", "ok", "ok"])]))),
            ["p/ok"]
        );
        assert!(matches!(t.expand(&Variables::new()), Expansion::Nothing(_)));
    }

    #[test]
    fn values_holding_separators_never_reach_into_another_space() {
        let route = Template::parse("route:a.test/partners/${cert:Subject.O}/*").unwrap();
        let filter = Template::parse("topicfilter:telemetry/${mqtt:ClientId}/#").unwrap();
        let topic = Template::parse("topic:${mqtt:ClientId}/x").unwrap();
        for (t, bad) in [
            (&route, "Acme/secret"),
            (&route, "Acme*"),
            (&filter, "+"),
            (&filter, "#"),
            (&filter, "a/b"),
            (&topic, "$aws"),
        ] {
            let v = vars(&[("cert:Subject.O", &[bad]), ("mqtt:ClientId", &[bad])]);
            assert!(
                matches!(t.expand_resource(&v), Expansion::Nothing(_)),
                "{} with {bad:?}",
                t.text()
            );
        }
        let v = vars(&[("cert:Subject.O", &["Acme+Co #1"])]);
        assert_eq!(
            values(route.expand_resource(&v)),
            ["route:a.test/partners/Acme+Co #1/*"]
        );
        // Condition values keep only the wildcard rule.
        let condition = Template::parse("${cert:Subject.O}").unwrap();
        assert_eq!(
            values(condition.expand(&vars(&[("cert:Subject.O", &["a/b"])]))),
            ["a/b"]
        );
    }

    #[test]
    fn expansion_beyond_the_cap_gives_nothing() {
        let many: Vec<String> = (0..17).map(|i| format!("v{i}")).collect();
        let mut v = Variables::new();
        v.set("cert:SAN.DNS", many.clone());
        v.set("thing:Name", many);
        let t = Template::parse("${cert:SAN.DNS}/${thing:Name}").unwrap();
        match t.expand(&v) {
            Expansion::Nothing(why) => assert!(why.contains("289"), "{why}"),
            Expansion::Values(v) => panic!("expanded to {} patterns", v.len()),
        }
        let sixteen: Vec<String> = (0..16).map(|i| format!("v{i}")).collect();
        v.set("thing:Name", sixteen);
        v.set("cert:SAN.DNS", (0..16).map(|i| format!("d{i}")).collect());
        assert_eq!(values(t.expand(&v)).len(), 256);
    }

    #[test]
    fn variables_map_basics() {
        let mut v = Variables::new();
        assert!(v.get("cert:Subject.CN").is_empty());
        v.set("thing:Name", vec!["b".into()]);
        v.set("cert:Subject.CN", vec!["a".into()]);
        let names: Vec<&str> = v.iter().map(|(k, _)| k).collect();
        assert_eq!(names, ["cert:Subject.CN", "thing:Name"]);
        v.set("thing:Name", Vec::new());
        assert_eq!(v.iter().count(), 1);
        assert_eq!(
            serde_json::to_value(&v).unwrap(),
            serde_json::json!({"cert:Subject.CN": ["a"]})
        );
    }
}

#[cfg(test)]
mod certificate_tests {
    use super::*;
    use portcullis_pki::{
        CaIssuer, IssueRequest, KeyType, PrivateKey, Profile, SubjectAltName, SubjectName,
    };

    fn client(subject: SubjectName, sans: &[&str]) -> Certificate {
        let ca_key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let ca_subject = SubjectName {
            organization: Some("Portcullis Test".into()),
            ..SubjectName::cn("Partner CA")
        };
        let ca = portcullis_pki::issue::issue(
            &IssueRequest::new(Profile::RootCa, ca_subject),
            &ca_key,
            None,
        )
        .unwrap();
        let issuer = CaIssuer::new(ca, ca_key, Vec::new()).unwrap();
        let mut req = IssueRequest::new(Profile::Client, subject);
        req.subject_alt_names = sans
            .iter()
            .map(|s| s.parse::<SubjectAltName>().unwrap())
            .collect();
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        portcullis_pki::issue::issue(&req, &key, Some(&issuer)).unwrap()
    }

    #[test]
    fn certificate_fields_become_variables() {
        let cert = client(
            SubjectName {
                common_name: "sensor-1".into(),
                organization: Some("acme".into()),
                organizational_unit: Some("payments".into()),
                country: Some("FR".into()),
            },
            &[
                "dns:a.example.com",
                "dns:b.example.com",
                "uri:spiffe://acme/sensor-1",
                "email:ops@acme.example",
                "ip:192.0.2.1",
            ],
        );
        let id = cert.info().id.clone();
        let v = Variables::from_certificate(&cert, &id);
        assert_eq!(v.get("cert:Subject.CN"), ["sensor-1"]);
        assert_eq!(v.get("cert:Subject.O"), ["acme"]);
        assert_eq!(v.get("cert:Subject.OU"), ["payments"]);
        assert_eq!(v.get("cert:Subject.C"), ["FR"]);
        assert_eq!(v.get("cert:Issuer.CN"), ["Partner CA"]);
        assert_eq!(v.get("cert:Issuer.O"), ["Portcullis Test"]);
        assert_eq!(v.get("cert:SerialNumber"), [cert.info().serial.clone()]);
        assert_eq!(v.get("cert:Id"), std::slice::from_ref(&id));
        assert_eq!(id.len(), 64);
        assert_eq!(v.get("cert:SAN.DNS"), ["a.example.com", "b.example.com"]);
        assert_eq!(v.get("cert:SAN.URI"), ["spiffe://acme/sensor-1"]);
        assert_eq!(v.get("cert:SAN.Email"), ["ops@acme.example"]);
        assert!(v.get("thing:Name").is_empty());
    }

    #[test]
    fn absent_certificate_fields_have_no_value() {
        let cert = client(SubjectName::cn("bare"), &[]);
        let v = Variables::from_certificate(&cert, "00");
        let names: Vec<&str> = v.iter().map(|(k, _)| k).collect();
        assert_eq!(
            names,
            [
                "cert:Id",
                "cert:Issuer.CN",
                "cert:Issuer.O",
                "cert:SerialNumber",
                "cert:Subject.CN"
            ]
        );
    }
}
