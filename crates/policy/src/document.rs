//! Policy documents: the JSON format, parsed and checked in full so that a stored policy can
//! always be bound and evaluated.

use std::fmt;
use std::net::IpAddr;

use serde::Serialize;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::glob::{Glob, glob_match};
use crate::variables::{Template, VARIABLES_ARE, canonical_variable, unknown_variable};

/// Largest policy document, in bytes of JSON text.
pub const MAX_DOCUMENT_BYTES: usize = 20 * 1024;
/// Most statements in one document.
pub const MAX_STATEMENTS: usize = 100;
/// Longest Action or Resource pattern or condition value, in bytes.
pub const MAX_PATTERN_BYTES: usize = 1024;
/// Most patterns in one Action or Resource list, and most values for one condition key.
pub const MAX_PATTERNS: usize = 50;

const MQTT_ACTIONS: [&str; 4] = ["connect", "publish", "receive", "subscribe"];
const ACTIONS_ARE: &str = "actions are http:<METHOD>, grpc:Invoke, mqtt:Connect, mqtt:Publish, \
                           mqtt:Receive, mqtt:Subscribe (AWS IoT's iot:Connect, iot:Publish, \
                           iot:Receive, iot:Subscribe are the same)";
const RESOURCES_ARE: &str = "resources are route:<domain>/<path>, grpc:<package.Service>/<Method>, \
                             client:<id>, topic:<name>, topicfilter:<filter>, a pattern starting \
                             with *, or an AWS IoT ARN (arn:aws:iot:<region>:<account>:topic/<name>…)";
const RESOURCE_TYPES: [&str; 5] = ["route:", "grpc:", "client:", "topic:", "topicfilter:"];

/// A parsed, checked policy document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    version: Option<String>,
    statements: Vec<Statement>,
}

/// One statement of a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    sid: Option<String>,
    effect: Effect,
    actions: Vec<String>,
    /// The action patterns, lower-cased (actions match case-insensitively).
    pub(crate) action_globs: Vec<Glob>,
    pub(crate) resources: Vec<Template>,
    /// AWS IoT ARNs of resources with no counterpart here (`thing/…`): they match nothing.
    pub(crate) foreign: Vec<String>,
    pub(crate) conditions: Vec<Condition>,
}

/// What a statement does when it applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Effect {
    /// Allows the request, unless another statement denies it.
    Allow,
    /// Denies the request, whatever else allows it.
    Deny,
}

/// Why a policy document was refused: where, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// Where in the document, as `Statement[1].Resource[0]`; empty for the whole document.
    pub path: String,
    /// What is wrong and how to fix it, one line.
    pub message: String,
}

/// A condition operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operator {
    StringEquals,
    StringNotEquals,
    StringLike,
    StringNotLike,
    IpAddress,
    NotIpAddress,
    DateLessThan,
    DateGreaterThan,
    Bool,
}

/// One condition: an operator, a key and the values it lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Condition {
    pub(crate) operator: Operator,
    pub(crate) key: String,
    pub(crate) values: ConditionValues,
}

/// A condition's values, typed by its operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ConditionValues {
    /// String operators: values with variables.
    Strings(Vec<Template>),
    /// Ip operators: networks.
    Networks(Vec<Network>),
    /// Date operators: unix seconds.
    Times(Vec<i64>),
}

/// An IPv4 or IPv6 network (a single address is a full-length prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Policy {
    /// Parses and checks a policy document. Errors name the place (`Statement[1].Action[0]`)
    /// and say how to fix it; invalid JSON names the line and column.
    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        if text.len() > MAX_DOCUMENT_BYTES {
            return Err(PolicyError::new(
                "",
                format!(
                    "the policy document is {} bytes, more than the {MAX_DOCUMENT_BYTES} allowed; \
                     split it into several policies",
                    text.len()
                ),
            ));
        }
        let json: Json = serde_json::from_str(text)
            .map_err(|e| PolicyError::new("", format!("invalid JSON: {e}")))?;
        Policy::from_json(&json)
    }

    /// Parses and checks a policy document already read as JSON (as the registry stores it).
    /// Its compact text must fit [`MAX_DOCUMENT_BYTES`].
    pub fn from_value(value: &serde_json::Value) -> Result<Policy, PolicyError> {
        Policy::parse(&value.to_string())
    }

    /// The `Version` field, when given.
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    /// The statements, in document order.
    pub fn statements(&self) -> &[Statement] {
        &self.statements
    }

    fn from_json(json: &Json) -> Result<Policy, PolicyError> {
        let top = json.object(
            "",
            "a policy document is a JSON object with Version and Statement",
        )?;
        only_keys(
            top,
            "",
            &["Version", "Statement"],
            "policy keys are Version and Statement",
        )?;
        let version = match field(top, "Version") {
            Some(v) => Some(v.string("Version")?.to_string()),
            None => None,
        };
        let statements: Vec<(String, &Json)> = match field(top, "Statement") {
            None => {
                return Err(PolicyError::new(
                    "Statement",
                    "is missing; a policy needs at least one statement",
                ));
            }
            Some(Json::Array(items)) if items.is_empty() => {
                return Err(PolicyError::new(
                    "Statement",
                    "is empty; a policy needs at least one statement",
                ));
            }
            Some(Json::Array(items)) if items.len() > MAX_STATEMENTS => {
                return Err(PolicyError::new(
                    "Statement",
                    format!(
                        "has {} statements, more than the {MAX_STATEMENTS} allowed; split the \
                         policy",
                        items.len()
                    ),
                ));
            }
            Some(Json::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("Statement[{i}]"), s))
                .collect(),
            Some(single @ Json::Object(_)) => vec![("Statement[0]".to_string(), single)],
            Some(other) => {
                return Err(PolicyError::new(
                    "Statement",
                    format!(
                        "must be a statement object or an array of them, not {}",
                        other.kind()
                    ),
                ));
            }
        };
        let mut parsed: Vec<Statement> = Vec::with_capacity(statements.len());
        for (path, json) in statements {
            let statement = Statement::from_json(&path, json)?;
            if let Some(sid) = &statement.sid
                && let Some(earlier) = parsed.iter().position(|s| s.sid.as_ref() == Some(sid))
            {
                return Err(PolicyError::new(
                    format!("{path}.Sid"),
                    format!(
                        "\"{sid}\" is already the Sid of Statement[{earlier}]; Sids must be unique"
                    ),
                ));
            }
            parsed.push(statement);
        }
        Ok(Policy {
            version,
            statements: parsed,
        })
    }
}

impl Statement {
    /// The `Sid`, when given.
    pub fn sid(&self) -> Option<&str> {
        self.sid.as_deref()
    }

    /// Allow or Deny.
    pub fn effect(&self) -> Effect {
        self.effect
    }

    /// The Action patterns as written.
    pub fn actions(&self) -> &[String] {
        &self.actions
    }

    /// The Resource patterns as written, variables included.
    pub fn resources(&self) -> impl Iterator<Item = &str> {
        self.resources.iter().map(Template::text)
    }

    fn from_json(path: &str, json: &Json) -> Result<Statement, PolicyError> {
        let obj = json.object(
            path,
            "a statement is a JSON object with Effect, Action, Resource",
        )?;
        only_keys(
            obj,
            path,
            &["Sid", "Effect", "Action", "Resource", "Condition"],
            "statement keys are Sid, Effect, Action, Resource, Condition",
        )?;
        let at = |key: &str| format!("{path}.{key}");
        let sid = match field(obj, "Sid") {
            Some(v) => {
                let sid = v.string(&at("Sid"))?;
                if sid.chars().any(char::is_control) {
                    return Err(PolicyError::new(
                        at("Sid"),
                        "must not contain control characters",
                    ));
                }
                Some(sid.to_string())
            }
            None => None,
        };
        let effect = match field(obj, "Effect")
            .map(|v| v.string(&at("Effect")))
            .transpose()?
        {
            Some("Allow") => Effect::Allow,
            Some("Deny") => Effect::Deny,
            Some(other) => {
                return Err(PolicyError::new(
                    at("Effect"),
                    format!("\"{other}\" must be \"Allow\" or \"Deny\""),
                ));
            }
            None => {
                return Err(PolicyError::new(
                    at("Effect"),
                    "is missing; write \"Allow\" or \"Deny\"",
                ));
            }
        };
        let mut actions = Vec::new();
        let mut action_globs = Vec::new();
        for (path, action) in patterns(obj, &at("Action"))? {
            let matched = check_action(action).map_err(|m| PolicyError::new(path, m))?;
            actions.push(action.to_string());
            if let Some(matched) = matched {
                action_globs.push(Glob::new(&matched));
            }
        }
        let mut resources = Vec::new();
        let mut foreign = Vec::new();
        for (path, resource) in patterns(obj, &at("Resource"))? {
            match check_resource(resource).map_err(|m| PolicyError::new(path, m))? {
                Some(template) => resources.push(template),
                None => foreign.push(resource.to_string()),
            }
        }
        let conditions = match field(obj, "Condition") {
            Some(c) => conditions(&at("Condition"), c)?,
            None => Vec::new(),
        };
        Ok(Statement {
            sid,
            effect,
            actions,
            action_globs,
            resources,
            foreign,
            conditions,
        })
    }
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Effect::Allow => "Allow",
            Effect::Deny => "Deny",
        })
    }
}

impl PolicyError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> PolicyError {
        PolicyError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for PolicyError {}

impl Operator {
    const ALL: [Operator; 9] = [
        Operator::StringEquals,
        Operator::StringNotEquals,
        Operator::StringLike,
        Operator::StringNotLike,
        Operator::IpAddress,
        Operator::NotIpAddress,
        Operator::DateLessThan,
        Operator::DateGreaterThan,
        Operator::Bool,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Operator::StringEquals => "StringEquals",
            Operator::StringNotEquals => "StringNotEquals",
            Operator::StringLike => "StringLike",
            Operator::StringNotLike => "StringNotLike",
            Operator::IpAddress => "IpAddress",
            Operator::NotIpAddress => "NotIpAddress",
            Operator::DateLessThan => "DateLessThan",
            Operator::DateGreaterThan => "DateGreaterThan",
            Operator::Bool => "Bool",
        }
    }
}

impl Network {
    /// Parses `10.0.0.0/8`, `::1/128` or a single address.
    fn parse(text: &str) -> Result<Network, String> {
        let bad = || {
            format!(
                "\"{text}\" is not an IP address or CIDR network; write for example 10.0.0.0/8, \
                 192.0.2.7 or 2001:db8::/32"
            )
        };
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => {
                let addr: IpAddr = addr.parse().map_err(|_| bad())?;
                if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                let prefix: u8 = prefix.parse().map_err(|_| bad())?;
                (addr, prefix)
            }
            None => {
                let addr: IpAddr = text.parse().map_err(|_| bad())?;
                (addr, if addr.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!(
                "\"{text}\": the prefix length must be at most {max} for this address"
            ));
        }
        let net = Network { addr, prefix };
        let masked = net.masked();
        if masked != addr {
            return Err(format!(
                "\"{text}\" has bits set beyond the prefix; write {masked}/{prefix}"
            ));
        }
        Ok(net.canonical())
    }

    /// True when `ip` is inside the network. IPv4-mapped IPv6 addresses count as IPv4.
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical_ip(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }

    fn masked(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }

    /// `::ffff:10.0.0.0/104` is `10.0.0.0/8`, so that it matches IPv4 clients.
    fn canonical(self) -> Network {
        match self.addr {
            IpAddr::V6(a) if self.prefix >= 96 => match a.to_ipv4_mapped() {
                Some(v4) => Network {
                    addr: IpAddr::V4(v4),
                    prefix: self.prefix - 96,
                },
                None => self,
            },
            _ => self,
        }
    }
}

/// An IPv4-mapped IPv6 address (as a dual-stack socket reports IPv4 peers) as IPv4.
pub(crate) fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Checks an Action pattern: `http:<METHOD>`, an `mqtt:` action, or a wildcard pattern that can
/// match one of them; gives the lower-cased pattern requests are matched with. AWS IoT's
/// `iot:Connect`, `iot:Publish`, `iot:Receive` and `iot:Subscribe` (and patterns of them, such
/// as `iot:*`) are the `mqtt:` actions; its other actions (shadows, jobs, retained-message
/// reads) name nothing here, so they are accepted and match nothing (`None`).
fn check_action(action: &str) -> Result<Option<String>, String> {
    let unknown = || format!("unknown action \"{action}\"; {ACTIONS_ARE}");
    if action.contains("${") {
        return Err(format!(
            "\"{action}\": actions cannot use variables; {ACTIONS_ARE}"
        ));
    }
    // Letters, digits and the HTTP token characters, plus ':' and the wildcard '?'.
    if !action
        .bytes()
        .all(|b| is_tchar(b) || b == b':' || b == b'?')
    {
        return Err(unknown());
    }
    let lower = action.to_ascii_lowercase();
    match lower.split_once(':') {
        Some(("http", method)) if !method.is_empty() && !method.contains(':') => Ok(Some(lower)),
        Some(("mqtt", name)) => {
            let glob = Glob::new(name);
            if MQTT_ACTIONS.iter().any(|a| glob.matches(a)) {
                Ok(Some(lower))
            } else {
                Err(format!(
                    "\"{action}\" matches no MQTT action; {ACTIONS_ARE}"
                ))
            }
        }
        Some(("grpc", name)) => {
            if Glob::new(name).matches("invoke") {
                Ok(Some(lower))
            } else {
                Err(format!(
                    "\"{action}\" matches no gRPC action; {ACTIONS_ARE}"
                ))
            }
        }
        Some(("iot", name)) if !name.is_empty() && !name.contains(':') => {
            let glob = Glob::new(name);
            if MQTT_ACTIONS.iter().any(|a| glob.matches(a)) {
                Ok(Some(format!("mqtt:{name}")))
            } else {
                Ok(None)
            }
        }
        Some((service, _)) if service.contains(['*', '?']) => {
            if glob_match(service, "http")
                || glob_match(service, "mqtt")
                || glob_match(service, "grpc")
            {
                Ok(Some(lower))
            } else {
                Err(unknown())
            }
        }
        Some(_) => Err(unknown()),
        None => {
            // No ':' at all: only a wildcard pattern (`*`, `*Publish`, `mqtt*`) can match.
            let literal = lower.split(['*', '?']).next().unwrap_or("");
            let wild = lower.len() != literal.len();
            if wild
                && ["http:", "mqtt:", "grpc:"]
                    .iter()
                    .any(|s| s.starts_with(literal))
            {
                Ok(Some(lower))
            } else {
                Err(unknown())
            }
        }
    }
}

/// An HTTP token character (RFC 9110 `tchar`).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Checks a Resource pattern: a known type prefix or a leading `*`, and valid variables. An AWS
/// IoT ARN is read as the resource it names (`arn:aws:iot:<region>:<account>:topic/a/b` is
/// `topic:a/b`; region and account are not checked: one gateway is one account and region);
/// an ARN of another IoT resource type (`thing/…`, `cert/…`) names nothing here (`None`).
fn check_resource(resource: &str) -> Result<Option<Template>, String> {
    let resource = match aws_arn(resource)? {
        Arn::Plain => resource.to_string(),
        Arn::Resource(ours) => ours,
        Arn::Nothing => return Ok(None),
    };
    let template = Template::parse(&resource)?;
    if resource.starts_with('*') {
        return Ok(Some(template));
    }
    let Some(kind) = RESOURCE_TYPES.iter().find(|t| resource.starts_with(*t)) else {
        return Err(format!(
            "unknown resource type in \"{resource}\"; {RESOURCES_ARE}"
        ));
    };
    if *kind == "grpc:" && !resource.contains(['/', '*']) {
        return Err(format!(
            "\"{resource}\" names a service without a method, so it matches no call; write \
             {resource}/* for every method"
        ));
    }
    if *kind == "route:" && !resource.contains(['/', '*']) {
        return Err(format!(
            "\"{resource}\" names no path, so it matches no request; write {resource}/* for \
             every path"
        ));
    }
    Ok(Some(template))
}

/// What an AWS ARN resource is here.
enum Arn {
    /// Not an ARN.
    Plain,
    /// The resource it names, in our form.
    Resource(String),
    /// An IoT resource this gateway has no counterpart for: matches nothing.
    Nothing,
}

/// The IoT resource types an ARN may name, and what each is here.
const ARN_TYPES: [(&str, Option<&str>); 10] = [
    ("client", Some("client:")),
    ("topic", Some("topic:")),
    ("topicfilter", Some("topicfilter:")),
    ("thing", None),
    ("thinggroup", None),
    ("thingtype", None),
    ("cert", None),
    ("cacert", None),
    ("rolealias", None),
    ("job", None),
];

/// Reads `arn:<partition>:iot:<region>:<account>:<type>/<rest>`.
fn aws_arn(resource: &str) -> Result<Arn, String> {
    let Some(rest) = resource.strip_prefix("arn:") else {
        return Ok(Arn::Plain);
    };
    let bad = |why: &str| {
        Err(format!(
            "\"{resource}\" is not an AWS IoT ARN this gateway reads ({why}); write \
             arn:aws:iot:<region>:<account>:topic/<name> (or client/, topicfilter/), or {RESOURCES_ARE}"
        ))
    };
    let mut parts = rest.splitn(5, ':');
    let (Some(partition), Some(service), Some(region), Some(account), Some(name)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return bad("an ARN has six ':'-separated parts");
    };
    if !matches!(partition, "aws" | "aws-cn" | "aws-us-gov" | "*") {
        return bad("unknown partition");
    }
    if service != "iot" {
        return bad("only the iot service has resources here");
    }
    let plain = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*' || b == b'?')
    };
    if !plain(region) || !plain(account) {
        return bad("region and account are letters, digits, - or wildcards");
    }
    if name == "*" {
        return Ok(Arn::Resource("*".to_string()));
    }
    let Some((kind, path)) = name.split_once('/') else {
        return bad("the resource is <type>/<name>, or * for every resource");
    };
    match ARN_TYPES.iter().find(|(t, _)| *t == kind) {
        Some((_, Some(ours))) => Ok(Arn::Resource(format!("{ours}{path}"))),
        Some((_, None)) => Ok(Arn::Nothing),
        None if kind.contains(['*', '?']) => {
            bad("write the resource type out (topic/, client/, topicfilter/)")
        }
        None => bad("unknown resource type"),
    }
}

/// The patterns of an Action or Resource field: a string or a non-empty array of strings, with
/// the path of each.
fn patterns<'a>(
    obj: &'a [(String, Json)],
    path: &str,
) -> Result<Vec<(String, &'a str)>, PolicyError> {
    let key = path.rsplit('.').next().unwrap_or(path);
    let Some(value) = field(obj, key) else {
        return Err(PolicyError::new(
            path,
            format!("is missing; a statement needs {key} (a string or an array of strings)"),
        ));
    };
    let list = string_list(path, value, key)?;
    for (p, s) in &list {
        if s.is_empty() {
            return Err(PolicyError::new(p, "must not be empty"));
        }
        check_length(p, s)?;
    }
    Ok(list)
}

fn check_length(path: &str, s: &str) -> Result<(), PolicyError> {
    if s.len() > MAX_PATTERN_BYTES {
        return Err(PolicyError::new(
            path,
            format!(
                "is {} bytes, more than the {MAX_PATTERN_BYTES} allowed",
                s.len()
            ),
        ));
    }
    Ok(())
}

/// A string or a non-empty array of at most [`MAX_PATTERNS`] strings, with the path of each.
fn string_list<'a>(
    path: &str,
    value: &'a Json,
    what: &str,
) -> Result<Vec<(String, &'a str)>, PolicyError> {
    match value {
        Json::String(s) => Ok(vec![(path.to_string(), s.as_str())]),
        Json::Array(items) if items.is_empty() => Err(PolicyError::new(
            path,
            format!("is an empty list; give at least one {what} value"),
        )),
        Json::Array(items) if items.len() > MAX_PATTERNS => Err(PolicyError::new(
            path,
            format!(
                "lists {} values, more than the {MAX_PATTERNS} allowed; use wildcards or split \
                 the statement",
                items.len()
            ),
        )),
        Json::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let p = format!("{path}[{i}]");
                let s = item.string(&p)?;
                Ok((p, s))
            })
            .collect(),
        other => Err(PolicyError::new(
            path,
            format!(
                "must be a string or an array of strings, not {}",
                other.kind()
            ),
        )),
    }
}

fn conditions(path: &str, json: &Json) -> Result<Vec<Condition>, PolicyError> {
    let operators = Operator::ALL.map(Operator::as_str).join(", ");
    let obj = json.object(
        path,
        "must be an object mapping operators to {key: values}, such as \
         {\"StringEquals\": {\"cert:Subject.O\": \"acme\"}}",
    )?;
    let mut out = Vec::new();
    for (name, block) in obj {
        let op_path = format!("{path}.{name}");
        let Some(operator) = Operator::ALL.into_iter().find(|o| o.as_str() == name) else {
            return Err(PolicyError::new(
                op_path,
                format!("unknown condition operator; operators are {operators}"),
            ));
        };
        let block = block.object(
            &op_path,
            "must be an object mapping condition keys to a value or a list of values",
        )?;
        for (key, values) in block {
            let key_path = format!("{op_path}.{key}");
            let key =
                check_condition_key(operator, key).map_err(|m| PolicyError::new(&key_path, m))?;
            // Bool also takes JSON's true and false, as AWS does.
            let literal = match values {
                Json::Bool(b) if operator == Operator::Bool => Some(b.to_string()),
                _ => None,
            };
            let list = match &literal {
                Some(b) => vec![(key_path.clone(), b.as_str())],
                None => string_list(&key_path, values, "condition")?,
            };
            for (p, v) in &list {
                check_length(p, v)?;
            }
            let values = match operator {
                Operator::IpAddress | Operator::NotIpAddress => ConditionValues::Networks(
                    list.iter()
                        .map(|(p, v)| Network::parse(v).map_err(|m| PolicyError::new(p, m)))
                        .collect::<Result<_, _>>()?,
                ),
                Operator::DateLessThan | Operator::DateGreaterThan => ConditionValues::Times(
                    list.iter()
                        .map(|(p, v)| {
                            OffsetDateTime::parse(v, &Rfc3339)
                                .map(OffsetDateTime::unix_timestamp)
                                .map_err(|e| {
                                    PolicyError::new(
                                        p,
                                        format!(
                                            "\"{v}\" is not an RFC 3339 time ({e}); write for \
                                             example 2027-01-01T00:00:00Z"
                                        ),
                                    )
                                })
                        })
                        .collect::<Result<_, _>>()?,
                ),
                Operator::Bool => ConditionValues::Strings(
                    list.iter()
                        .map(|(p, v)| match v.to_ascii_lowercase().as_str() {
                            b @ ("true" | "false") => {
                                Template::parse(b).map_err(|m| PolicyError::new(p, m))
                            }
                            _ => Err(PolicyError::new(
                                p,
                                format!("\"{v}\" is not a Bool value; write \"true\" or \"false\""),
                            )),
                        })
                        .collect::<Result<_, _>>()?,
                ),
                _ => ConditionValues::Strings(
                    list.iter()
                        .map(|(p, v)| Template::parse(v).map_err(|m| PolicyError::new(p, m)))
                        .collect::<Result<_, _>>()?,
                ),
            };
            out.push(Condition {
                operator,
                key,
                values,
            });
        }
    }
    Ok(out)
}

/// Checks a condition key for its operator and gives the name it stands for (AWS IoT's
/// `aws:SourceIp`, `aws:CurrentTime` and variable names are ours).
fn check_condition_key(operator: Operator, key: &str) -> Result<String, String> {
    let op = operator.as_str();
    let key = match key {
        "aws:SourceIp" => "conn:SourceIp",
        "aws:CurrentTime" => "conn:CurrentTime",
        other => other,
    };
    match operator {
        Operator::IpAddress | Operator::NotIpAddress if key != "conn:SourceIp" => Err(format!(
            "unknown condition key for {op}; its only key is conn:SourceIp (aws:SourceIp)"
        )),
        Operator::DateLessThan | Operator::DateGreaterThan if key != "conn:CurrentTime" => {
            Err(format!(
                "unknown condition key for {op}; its only key is conn:CurrentTime \
                 (aws:CurrentTime)"
            ))
        }
        Operator::IpAddress
        | Operator::NotIpAddress
        | Operator::DateLessThan
        | Operator::DateGreaterThan => Ok(key.to_string()),
        _ => {
            if let Some(canonical) = canonical_variable(key) {
                return Ok(canonical);
            }
            if let Some(inner) = key.strip_prefix("${").and_then(|k| k.strip_suffix('}'))
                && canonical_variable(inner).is_some()
            {
                return Err(format!(
                    "write the condition key without ${{}}: \"{inner}\""
                ));
            }
            if key == "conn:SourceIp" || key == "conn:CurrentTime" {
                return Err(format!(
                    "{key} is not a string; use it with IpAddress/NotIpAddress or \
                     DateLessThan/DateGreaterThan"
                ));
            }
            if key.starts_with("iot:") || key.starts_with("aws:") {
                return Err(unknown_variable(key));
            }
            Err(format!("unknown condition key for {op}; {VARIABLES_ARE}"))
        }
    }
}

/// Refuses keys not in `allowed`, naming the first one.
fn only_keys(
    obj: &[(String, Json)],
    path: &str,
    allowed: &[&str],
    hint: &str,
) -> Result<(), PolicyError> {
    match obj.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        Some((key, _)) => Err(PolicyError::new(
            if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            },
            format!("unknown key; {hint} (case-sensitive)"),
        )),
        None => Ok(()),
    }
}

fn field<'a>(obj: &'a [(String, Json)], key: &str) -> Option<&'a Json> {
    obj.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// JSON as parsed for checking: keys in document order, duplicates refused (two `Effect`s in a
/// statement must not silently become the last one).
#[derive(Debug)]
enum Json {
    Null,
    Bool(bool),
    Number,
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    fn kind(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "a boolean",
            Json::Number => "a number",
            Json::String(_) => "a string",
            Json::Array(_) => "an array",
            Json::Object(_) => "an object",
        }
    }

    fn string(&self, path: &str) -> Result<&str, PolicyError> {
        match self {
            Json::String(s) => Ok(s),
            other => Err(PolicyError::new(
                path,
                format!("must be a string, not {}", other.kind()),
            )),
        }
    }

    fn object(&self, path: &str, hint: &str) -> Result<&[(String, Json)], PolicyError> {
        match self {
            Json::Object(obj) => Ok(obj),
            other => Err(PolicyError::new(
                path,
                format!("is {}; {hint}", other.kind()),
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Json, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }

    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }

    fn visit_bool<E>(self, b: bool) -> Result<Json, E> {
        Ok(Json::Bool(b))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Json, E> {
        Ok(Json::Number)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Json, E> {
        Ok(Json::Number)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Json, E> {
        Ok(Json::Number)
    }

    fn visit_str<E>(self, s: &str) -> Result<Json, E> {
        Ok(Json::String(s.to_string()))
    }

    fn visit_string<E>(self, s: String) -> Result<Json, E> {
        Ok(Json::String(s))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut entries: Vec<(String, Json)> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if entries.iter().any(|(k, _)| *k == key) {
                return Err(de::Error::custom(format!(
                    "duplicate key \"{key}\"; give each key once"
                )));
            }
            let value = map.next_value()?;
            entries.push((key, value));
        }
        Ok(Json::Object(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> PolicyError {
        match Policy::parse(text) {
            Ok(p) => panic!("parsed: {p:?}\n{text}"),
            Err(e) => e,
        }
    }

    fn statement(body: &str) -> String {
        format!(r#"{{"Version": "2012-10-17", "Statement": [{ALLOW_ALL}, {body}]}}"#)
    }

    const ALLOW_ALL: &str = r#"{"Effect": "Allow", "Action": "*", "Resource": "*"}"#;

    #[test]
    fn parses_the_documented_example() {
        let p = Policy::parse(
            r#"{"Version": "2012-10-17",
             "Statement": [
               {"Sid": "partners-read", "Effect": "Allow",
                "Action": ["http:GET", "http:HEAD"],
                "Resource": "route:api.example.com/partners/${cert:Subject.O}/*",
                "Condition": {"StringEquals": {"cert:Subject.OU": ["payments", "treasury"]},
                              "IpAddress": {"conn:SourceIp": ["10.0.0.0/8", "::1/128"]},
                              "DateLessThan": {"conn:CurrentTime": "2027-01-01T00:00:00Z"}}}]}"#,
        )
        .unwrap();
        assert_eq!(p.version(), Some("2012-10-17"));
        let s = &p.statements()[0];
        assert_eq!(s.sid(), Some("partners-read"));
        assert_eq!(s.effect(), Effect::Allow);
        assert_eq!(s.actions(), ["http:GET", "http:HEAD"]);
        assert_eq!(
            s.resources().collect::<Vec<_>>(),
            ["route:api.example.com/partners/${cert:Subject.O}/*"]
        );
        assert_eq!(s.conditions.len(), 3);
        assert_eq!(
            s.conditions[2].values,
            ConditionValues::Times(vec![1_798_761_600])
        );
    }

    #[test]
    fn a_single_statement_object_and_single_strings_are_accepted() {
        let p = Policy::parse(
            r#"{"Statement": {"Effect": "Deny", "Action": "mqtt:*", "Resource": "topic:x"}}"#,
        )
        .unwrap();
        assert_eq!(p.version(), None);
        assert_eq!(p.statements().len(), 1);
        assert_eq!(p.statements()[0].effect(), Effect::Deny);
    }

    #[test]
    fn actions_are_checked() {
        for ok in [
            "http:GET",
            "http:get",
            "http:*",
            "http:P*",
            "http:M-SEARCH",
            "mqtt:Connect",
            "MQTT:publish",
            "mqtt:*",
            "mqtt:Sub*",
            "mqtt:?eceive",
            "*",
            "*:Publish",
            "mqtt*",
            "*Publish",
            "iot:Publish",
            "iot:*",
            "IOT:Connect",
            "iot:GetThingShadow",
            "iot:DescribeJobExecution",
            "grpc:Invoke",
            "grpc:*",
            "GRPC:invoke",
            "g*:Invoke",
        ] {
            Policy::parse(&statement(&format!(
                r#"{{"Effect": "Allow", "Action": "{ok}", "Resource": "*"}}"#
            )))
            .unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "GET",
            "s3:GetObject",
            "iot:",
            "mqtt:Retain",
            "mqtt:X*",
            "http:",
            "http:GE T",
            "x*:GET",
            "Q*",
            "http:${cert:Subject.CN}",
            "grpc:Call",
            "grpc:",
        ] {
            let e = error(&statement(&format!(
                r#"{{"Effect": "Allow", "Action": ["http:GET", "{bad}"], "Resource": "*"}}"#
            )));
            assert_eq!(e.path, "Statement[1].Action[1]", "{bad}: {e}");
            assert!(e.message.contains("http:<METHOD>"), "{bad}: {e}");
        }
        let e = error(&statement(
            r#"{"Effect": "Allow", "Action": "s3:Get", "Resource": "*"}"#,
        ));
        assert_eq!(
            e.to_string(),
            format!("Statement[1].Action: unknown action \"s3:Get\"; {ACTIONS_ARE}")
        );
    }

    #[test]
    fn resources_are_checked() {
        for ok in [
            "route:api.example.com/*",
            "route:*",
            "client:${mqtt:ClientId}",
            "topic:sensors/${thing:Name}/temp",
            "topicfilter:sensors/+/#",
            "grpc:billing.v1.Invoices/Get",
            "grpc:billing.v1.Invoices/*",
            "grpc:*",
            "*",
            "*/admin",
            "arn:aws:iot:us-east-1:123456789012:topic/sensors/${iot:ClientId}",
            "arn:aws:iot:*:*:topicfilter/sensors/#",
            "arn:aws-cn:iot:cn-north-1:1:client/${iot:Connection.Thing.ThingName}",
            "arn:aws:iot:us-east-1:123456789012:*",
            "arn:aws:iot:us-east-1:123456789012:thing/${iot:Connection.Thing.ThingName}",
        ] {
            Policy::parse(&statement(&format!(
                r#"{{"Effect": "Allow", "Action": "*", "Resource": "{ok}"}}"#
            )))
            .unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, says) in [
            ("arn:aws:iot:x", "six ':'-separated parts"),
            ("arn:aws:s3:::bucket/x", "only the iot service"),
            ("arn:aws:iot:us-east-1:1:topic*", "<type>/<name>"),
            (
                "arn:aws:iot:us-east-1:1:top*/x",
                "write the resource type out",
            ),
            ("arn:aws:iot:us-east-1:1:shelf/x", "unknown resource type"),
            ("arn:aws:iot:us east:1:topic/x", "region and account"),
            (
                "arn:aws:iot:r:1:topic/${iot:Connection.Thing.ThingTypeName}",
                "things here have no type",
            ),
            ("Route:a/b", "unknown resource type"),
            ("${thing:Name}", "unknown resource type"),
            ("route:api.example.com", "names no path"),
            ("grpc:billing.v1.Invoices", "without a method"),
            (
                "route:a/${cert:Subject.X}",
                "unknown variable ${cert:Subject.X}",
            ),
            ("route:a/${cert:Subject.CN", "not closed"),
            ("route:a/${}", "empty variable"),
            ("", "must not be empty"),
        ] {
            let e = error(&statement(&format!(
                r#"{{"Effect": "Allow", "Action": "*", "Resource": ["route:x/*", "{bad}"]}}"#
            )));
            assert_eq!(e.path, "Statement[1].Resource[1]", "{bad}: {e}");
            assert!(e.message.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn conditions_are_checked() {
        let cases = [
            (
                r#"{"IpAddress": {"conn:SourceIp": ["10.0.0.0/8", "::1/128", "10.0.0.0/33"]}}"#,
                "Statement[1].Condition.IpAddress.conn:SourceIp[2]",
                "at most 32",
            ),
            (
                r#"{"IpAddress": {"conn:SourceIp": "10.1.2.3/8"}}"#,
                "Statement[1].Condition.IpAddress.conn:SourceIp",
                "write 10.0.0.0/8",
            ),
            (
                r#"{"NotIpAddress": {"conn:SourceIp": ["10.0.0.300"]}}"#,
                "Statement[1].Condition.NotIpAddress.conn:SourceIp[0]",
                "not an IP address",
            ),
            (
                r#"{"DateLessThan": {"conn:CurrentTime": "2027-01-01"}}"#,
                "Statement[1].Condition.DateLessThan.conn:CurrentTime",
                "RFC 3339",
            ),
            (
                r#"{"StringEqualsIgnoreCase": {"cert:Subject.O": "x"}}"#,
                "Statement[1].Condition.StringEqualsIgnoreCase",
                "unknown condition operator",
            ),
            (
                r#"{"StringEquals": {"cert:Subject.X": "x"}}"#,
                "Statement[1].Condition.StringEquals.cert:Subject.X",
                "unknown condition key",
            ),
            (
                r#"{"StringEquals": {"${cert:Subject.O}": "x"}}"#,
                "Statement[1].Condition.StringEquals.${cert:Subject.O}",
                "without ${}",
            ),
            (
                r#"{"StringEquals": {"conn:SourceIp": "10.0.0.1"}}"#,
                "Statement[1].Condition.StringEquals.conn:SourceIp",
                "IpAddress",
            ),
            (
                r#"{"IpAddress": {"cert:Subject.O": "10.0.0.1"}}"#,
                "Statement[1].Condition.IpAddress.cert:Subject.O",
                "only key is conn:SourceIp",
            ),
            (
                r#"{"DateGreaterThan": {"conn:SourceIp": "2027-01-01T00:00:00Z"}}"#,
                "Statement[1].Condition.DateGreaterThan.conn:SourceIp",
                "only key is conn:CurrentTime",
            ),
            (
                r#"{"StringLike": {"cert:Subject.O": ["a", "${cert:Nope}"]}}"#,
                "Statement[1].Condition.StringLike.cert:Subject.O[1]",
                "unknown variable",
            ),
            (
                r#"{"StringLike": {"cert:Subject.O": []}}"#,
                "Statement[1].Condition.StringLike.cert:Subject.O",
                "empty list",
            ),
            (
                r#"{"StringLike": {"cert:Subject.O": 5}}"#,
                "Statement[1].Condition.StringLike.cert:Subject.O",
                "not a number",
            ),
            (
                r#"["StringLike"]"#,
                "Statement[1].Condition",
                "must be an object",
            ),
        ];
        for (condition, path, says) in cases {
            let e = error(&statement(&format!(
                r#"{{"Effect": "Allow", "Action": "*", "Resource": "*", "Condition": {condition}}}"#
            )));
            assert_eq!(e.path, path, "{condition}: {e}");
            assert!(e.message.contains(says), "{condition}: {e}");
        }
    }

    #[test]
    fn networks() {
        let net = |s: &str| Network::parse(s).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(net("10.0.0.0/8").contains(ip("10.255.0.1")));
        assert!(!net("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(net("10.0.0.0/8").contains(ip("::ffff:10.0.0.1")));
        assert!(net("0.0.0.0/0").contains(ip("192.0.2.1")));
        assert!(!net("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(net("192.0.2.7").contains(ip("192.0.2.7")));
        assert!(!net("192.0.2.7").contains(ip("192.0.2.8")));
        assert!(net("2001:db8::/32").contains(ip("2001:db8:1::1")));
        assert!(!net("2001:db8::/32").contains(ip("2001:db9::1")));
        assert!(net("::/0").contains(ip("::1")));
        assert!(net("::ffff:10.0.0.0/104").contains(ip("10.1.1.1")));
        assert!(Network::parse("::1/129").is_err());
        assert!(Network::parse("10.0.0.0/").is_err());
        assert!(Network::parse("10.0.0.0/+8").is_err());
        assert!(Network::parse("example.com").is_err());
    }

    #[test]
    fn document_errors() {
        let e = error("{\"Statement\": [\n  {\"Effect\": \"Allow\",}\n]}");
        assert!(e.path.is_empty());
        assert!(e.to_string().starts_with("invalid JSON: "), "{e}");
        assert!(e.to_string().contains("line 2 column"), "{e}");

        let e = error(r#"{"Effect": "Allow", "Effect": "Deny"}"#);
        assert!(e.message.contains("duplicate key \"Effect\""), "{e}");
        assert!(e.message.contains("line 1"), "{e}");

        let e = error(r#"{"Statement": []}"#);
        assert_eq!(
            (e.path.as_str(), e.message.contains("empty")),
            ("Statement", true)
        );
        let e = error(r#"{"Version": "2012-10-17"}"#);
        assert_eq!(
            (e.path.as_str(), e.message.contains("missing")),
            ("Statement", true)
        );
        let e = error(r#"{"Statement": "x"}"#);
        assert_eq!(e.path, "Statement");
        let e = error(r#"[]"#);
        assert_eq!(e.path, "");
        let e = error(&format!(r#"{{"Statment": [{ALLOW_ALL}]}}"#));
        assert_eq!(
            e.to_string(),
            "Statment: unknown key; policy keys are Version and Statement (case-sensitive)"
        );
        let e = error(r#"{"Version": 1, "Statement": []}"#);
        assert_eq!(e.path, "Version");

        let e = error(&statement(
            r#"{"Effect": "Allow", "Action": "*", "Resource": "*", "NotAction": "x"}"#,
        ));
        assert_eq!(e.path, "Statement[1].NotAction");
        assert!(e.message.contains("unknown key"), "{e}");
        let e = error(&statement(
            r#"{"Effect": "allow", "Action": "*", "Resource": "*"}"#,
        ));
        assert_eq!(e.path, "Statement[1].Effect");
        let e = error(&statement(r#"{"Action": "*", "Resource": "*"}"#));
        assert_eq!(e.path, "Statement[1].Effect");
        let e = error(&statement(r#"{"Effect": "Allow", "Resource": "*"}"#));
        assert_eq!(e.path, "Statement[1].Action");
        let e = error(&statement(
            r#"{"Effect": "Allow", "Action": "*", "Resource": []}"#,
        ));
        assert_eq!(e.path, "Statement[1].Resource");
        let e = error(&statement(
            r#"{"Effect": "Allow", "Action": [1], "Resource": "*"}"#,
        ));
        assert_eq!(e.path, "Statement[1].Action[0]");
        let e = error(&statement(
            r#"{"Sid": "a\nb", "Effect": "Allow", "Action": "*", "Resource": "*"}"#,
        ));
        assert_eq!(e.path, "Statement[1].Sid");
        let e = error(
            r#"{"Statement": [{"Sid": "s", "Effect": "Allow", "Action": "*", "Resource": "*"},
                              {"Sid": "s", "Effect": "Deny", "Action": "*", "Resource": "*"}]}"#,
        );
        assert_eq!(e.path, "Statement[1].Sid");
        assert!(e.message.contains("Statement[0]"), "{e}");
    }

    #[test]
    fn limits_are_errors() {
        let big = format!(
            r#"{{"Statement": [{ALLOW_ALL}], "Version": "{}"}}"#,
            "x".repeat(MAX_DOCUMENT_BYTES)
        );
        let e = error(&big);
        assert_eq!(e.path, "");
        assert!(e.message.contains("20480"), "{e}");

        let many = vec![r#"{"Effect":"Allow","Action":"*","Resource":"*"}"#; MAX_STATEMENTS + 1];
        let e = error(&format!(r#"{{"Statement": [{}]}}"#, many.join(",")));
        assert_eq!(e.path, "Statement");
        assert!(e.message.contains("101"), "{e}");
        let hundred = &many[..MAX_STATEMENTS];
        assert!(Policy::parse(&format!(r#"{{"Statement": [{}]}}"#, hundred.join(","))).is_ok());

        let long = format!("route:a/{}", "x".repeat(MAX_PATTERN_BYTES));
        let e = error(&statement(&format!(
            r#"{{"Effect": "Allow", "Action": "*", "Resource": "{long}"}}"#
        )));
        assert_eq!(e.path, "Statement[1].Resource");
        assert!(e.message.contains("1024"), "{e}");

        let list = vec![r#""http:GET""#; MAX_PATTERNS + 1].join(",");
        let e = error(&statement(&format!(
            r#"{{"Effect": "Allow", "Action": [{list}], "Resource": "*"}}"#
        )));
        assert_eq!(e.path, "Statement[1].Action");
        assert!(e.message.contains("51"), "{e}");

        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(error(&deep).message.contains("invalid JSON"));
    }

    #[test]
    fn from_value_parses_the_stored_form() {
        let v =
            serde_json::json!({"Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]});
        assert_eq!(Policy::from_value(&v).unwrap().statements().len(), 1);
        let v = serde_json::json!({"Statement": [{"Effect": "Allow"}]});
        assert_eq!(
            Policy::from_value(&v).unwrap_err().path,
            "Statement[0].Action"
        );
    }
}

#[cfg(test)]
mod property_tests {
    use super::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop::sample::select(
                &[
                    "a",
                    "*",
                    "?",
                    "/",
                    "$",
                    "{",
                    "}",
                    ":",
                    "cert",
                    "${cert:Subject.CN}",
                    "\\",
                    "\"",
                    " ",
                    "é",
                ][..],
            ),
            0..12,
        )
        .prop_map(|parts| parts.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_documents_never_panic(doc in prop::collection::vec(any::<u8>(), 0..400)) {
            let _ = Policy::parse(&String::from_utf8_lossy(&doc));
        }

        #[test]
        fn near_valid_documents_never_panic(
            effect in prop::sample::select(&["Allow", "Deny", "allow", ""][..]),
            action in text(),
            resource in text(),
        ) {
            let doc = serde_json::json!({"Statement": [{"Effect": effect, "Action": action, "Resource": resource}]});
            let _ = Policy::parse(&doc.to_string());
        }
    }
}
