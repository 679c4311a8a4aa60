//! Binding policies to one connection's variables, and deciding requests.
//!
//! [`bind`] does the work that depends on the connection (substituting variables, compiling
//! the resulting patterns, settling string conditions, which only involve variables) once, so
//! that [`Bound::decide`] per request only matches globs and checks the source address and the
//! time.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::document::{
    Condition, ConditionValues, Effect, Network, Operator, Policy, canonical_ip,
};
use crate::glob::Glob;
use crate::variables::{Expansion, Variables};

/// Which policy, and which version of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyRef {
    /// The policy's name.
    pub name: String,
    /// The version in effect.
    pub version: i64,
}

/// One request to decide.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// `http:<METHOD>` or `mqtt:Connect|Publish|Receive|Subscribe` (matched case-insensitively).
    pub action: &'a str,
    /// `route:<domain>/<path>`, `client:<id>`, `topic:<name>` or `topicfilter:<filter>`
    /// (matched case-sensitively).
    pub resource: &'a str,
    /// The client's address, for `conn:SourceIp`; `None` makes Ip conditions fail.
    pub source_ip: Option<IpAddr>,
    /// The time of the request in unix seconds, for `conn:CurrentTime`.
    pub now: i64,
}

/// Policies bound to one connection's variables: what [`Bound::decide`] evaluates.
#[derive(Debug, Clone)]
pub struct Bound {
    policies: usize,
    statements: Vec<BoundStatement>,
    /// Set when the variables' certificate is ambiguous: every request is refused with this.
    refusal: Option<String>,
}

/// The answer for one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// The statement that decided: the Deny that applied, or the Allow that applied. `None`
    /// when nothing applied (denied by default).
    pub by: Option<StatementRef>,
    /// One line for people and logs.
    pub reason: String,
}

/// What [`Bound::outcome`] found for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An Allow statement applies and no Deny does.
    Allowed,
    /// A Deny statement applies.
    Denied,
    /// No statement applies (denied by default).
    Unmatched,
    /// The certificate's variables are ambiguous: every request is refused.
    Refused,
}

impl Outcome {
    /// Whether the request may proceed.
    pub fn allowed(self) -> bool {
        self == Outcome::Allowed
    }
}

enum Settled<'a> {
    Allowed(&'a BoundStatement),
    Denied(&'a BoundStatement),
    Unmatched,
}

/// Calls `f` with `s` in ASCII lower case, on the stack when short (actions are).
fn lowered<R>(s: &str, f: impl FnOnce(&str) -> R) -> R {
    if !s.bytes().any(|b| b.is_ascii_uppercase()) {
        return f(s);
    }
    let mut buffer = [0u8; 64];
    match buffer.get_mut(..s.len()) {
        Some(out) => {
            out.copy_from_slice(s.as_bytes());
            out.make_ascii_lowercase();
            // Lower-casing ASCII bytes keeps UTF-8 valid.
            f(std::str::from_utf8(out).unwrap_or_default())
        }
        None => f(&s.to_ascii_lowercase()),
    }
}

/// A statement of a policy version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatementRef {
    /// The policy's name.
    pub policy: String,
    /// The policy's version.
    pub version: i64,
    /// The statement's position in the document, from 0.
    pub index: usize,
    /// The statement's `Sid`, when given.
    pub sid: Option<String>,
    /// The statement's effect.
    pub effect: Effect,
}

/// How one statement fared against a request, for `explain` and `policy simulate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatementTrace {
    /// The statement.
    pub statement: StatementRef,
    /// Whether it applied (its effect counts).
    pub applied: bool,
    /// The first part that did not match, when it did not apply.
    pub failed: Option<Mismatch>,
}

/// The part of a statement that kept it from applying.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "part", rename_all = "snake_case")]
pub enum Mismatch {
    /// No Action pattern matches the action.
    Action,
    /// No Resource pattern matches the resource.
    Resource,
    /// No Resource pattern survived variable substitution, so the statement matches nothing.
    Unbound {
        /// Why, for example `${cert:Subject.O} has no usable value`.
        detail: String,
    },
    /// A condition does not hold.
    Condition {
        /// The operator, such as `StringEquals`.
        operator: String,
        /// The condition key, such as `cert:Subject.OU`.
        key: String,
        /// Why, for example `conn:SourceIp 192.0.2.1 is in none of the networks`.
        detail: String,
    },
}

/// Binds `policies` to one connection's variables: substitutes them into every Resource
/// pattern and condition value and compiles the result. A variable without a usable value (none,
/// empty, or holding `*` or `?`) makes the pattern or value that uses it match nothing; a
/// statement left without Resource patterns applies to nothing, whatever its effect.
pub fn bind(policies: &[(PolicyRef, Arc<Policy>)], vars: &Variables) -> Bound {
    let mut statements = Vec::new();
    for (policy_ref, policy) in policies {
        for (index, statement) in policy.statements().iter().enumerate() {
            let mut resources = Vec::new();
            let mut unbound = Vec::new();
            for template in &statement.resources {
                match template.expand_resource(vars) {
                    Expansion::Values(values) => {
                        resources.extend(values.iter().map(|v| Glob::new(v)));
                    }
                    Expansion::Nothing(why) => {
                        if !unbound.contains(&why) {
                            unbound.push(why);
                        }
                    }
                }
            }
            if statement.action_globs.is_empty() {
                unbound.push(format!(
                    "{} name AWS IoT actions with no counterpart here",
                    statement.actions().join(", ")
                ));
            } else if statement.resources.is_empty() && !statement.foreign.is_empty() {
                unbound.push(format!(
                    "{} name AWS IoT resources with no counterpart here",
                    statement.foreign.join(", ")
                ));
            }
            statements.push(BoundStatement {
                by: StatementRef {
                    policy: policy_ref.name.clone(),
                    version: policy_ref.version,
                    index,
                    sid: statement.sid().map(str::to_string),
                    effect: statement.effect(),
                },
                actions: statement.action_globs.clone(),
                unbound: unbound.join("; "),
                resources,
                conditions: statement
                    .conditions
                    .iter()
                    .map(|c| BoundCondition::new(c, vars))
                    .collect(),
            });
        }
    }
    Bound {
        policies: policies.len(),
        statements,
        refusal: vars.ambiguity().map(|why| {
            format!("the certificate's subject is ambiguous ({why}), so no policy applies to it")
        }),
    }
}

impl Bound {
    /// Decides `req`: denied when a Deny statement applies, else allowed when an Allow statement
    /// applies, else denied.
    pub fn decide(&self, req: &Request<'_>) -> Decision {
        if let Some(refusal) = &self.refusal {
            return Decision {
                allowed: false,
                by: None,
                reason: refusal.clone(),
            };
        }
        match lowered(req.action, |action| self.settle(action, req)) {
            Settled::Denied(statement) => Decision {
                allowed: false,
                reason: format!("denied by {}", statement.by),
                by: Some(statement.by.clone()),
            },
            Settled::Allowed(statement) => Decision {
                allowed: true,
                reason: format!("allowed by {}", statement.by),
                by: Some(statement.by.clone()),
            },
            Settled::Unmatched => Decision {
                allowed: false,
                by: None,
                reason: format!(
                    "no statement of {} allows {} on {}",
                    plural(self.policies, "policy", "policies"),
                    one_line(req.action),
                    one_line(req.resource)
                ),
            },
        }
    }

    /// What [`Bound::decide`] would answer, without its reason or statement: no allocation,
    /// for the hot paths (every MQTT packet, every HTTP request), which ask `decide` only for
    /// the reason of a refusal.
    pub fn outcome(&self, req: &Request<'_>) -> Outcome {
        if self.refusal.is_some() {
            return Outcome::Refused;
        }
        match lowered(req.action, |action| self.settle(action, req)) {
            Settled::Denied(_) => Outcome::Denied,
            Settled::Allowed(_) => Outcome::Allowed,
            Settled::Unmatched => Outcome::Unmatched,
        }
    }

    /// The statement that decides `req`: the first Deny that applies, else the first Allow.
    fn settle<'a>(&'a self, action_lower: &str, req: &Request<'_>) -> Settled<'a> {
        let mut allow: Option<&BoundStatement> = None;
        for statement in &self.statements {
            if statement.by.effect == Effect::Allow && allow.is_some() {
                // Only a Deny can change the answer now.
                continue;
            }
            if statement.first_mismatch(action_lower, req).is_some() {
                continue;
            }
            match statement.by.effect {
                Effect::Deny => return Settled::Denied(statement),
                Effect::Allow => allow = Some(statement),
            }
        }
        allow.map_or(Settled::Unmatched, Settled::Allowed)
    }

    /// True when no decision depends on the time of the request (no `DateLessThan` or
    /// `DateGreaterThan` condition): a decision then holds for as long as the bound does, and
    /// may be remembered.
    pub fn timeless(&self) -> bool {
        self.statements.iter().all(|s| {
            s.conditions
                .iter()
                .all(|c| !matches!(c.test, Test::Times(_)))
        })
    }

    /// How every statement fared against `req`, in policy and statement order.
    pub fn trace(&self, req: &Request<'_>) -> Vec<StatementTrace> {
        let action = req.action.to_ascii_lowercase();
        self.statements
            .iter()
            .map(|statement| {
                let failed = match &self.refusal {
                    Some(refusal) => Some(Mismatch::Unbound {
                        detail: refusal.clone(),
                    }),
                    None => statement
                        .first_mismatch(&action, req)
                        .map(|part| statement.describe(part, req)),
                };
                StatementTrace {
                    statement: statement.by.clone(),
                    applied: failed.is_none(),
                    failed,
                }
            })
            .collect()
    }

    /// True when no statement can apply to any request (no policies, or every statement lost
    /// its Resource patterns or has a string condition that cannot hold for these variables),
    /// so that every request is denied.
    pub fn is_empty(&self) -> bool {
        self.refusal.is_some() || self.statements.iter().all(BoundStatement::is_dead)
    }
}

impl fmt::Display for StatementRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "statement {}", self.index)?;
        if let Some(sid) = &self.sid {
            write!(f, " (\"{sid}\")")?;
        }
        write!(f, " of policy {} v{}", self.policy, self.version)
    }
}

impl fmt::Display for StatementTrace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}]: ", self.statement, self.statement.effect)?;
        match &self.failed {
            None => f.write_str("applies"),
            Some(m) => write!(f, "does not apply: {m}"),
        }
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Action => f.write_str("no Action pattern matches the action"),
            Mismatch::Resource => f.write_str("no Resource pattern matches the resource"),
            Mismatch::Unbound { detail } => write!(f, "no Resource pattern is left: {detail}"),
            Mismatch::Condition {
                operator,
                key,
                detail,
            } => write!(f, "condition {operator}/{key} does not hold: {detail}"),
        }
    }
}

#[derive(Debug, Clone)]
struct BoundStatement {
    by: StatementRef,
    /// Lower-case action patterns.
    actions: Vec<Glob>,
    /// The Resource patterns after substitution; empty means the statement matches nothing.
    resources: Vec<Glob>,
    /// Why Resource patterns were lost to substitution, if any were.
    unbound: String,
    conditions: Vec<BoundCondition>,
}

/// Which part failed, cheap to compute; [`BoundStatement::describe`] words it for traces.
#[derive(Debug, Clone, Copy)]
enum Part {
    Action,
    Resource,
    Unbound,
    Condition(usize),
}

impl BoundStatement {
    fn first_mismatch(&self, action_lower: &str, req: &Request<'_>) -> Option<Part> {
        if self.actions.is_empty() {
            return Some(Part::Unbound);
        }
        if !self.actions.iter().any(|g| g.matches(action_lower)) {
            return Some(Part::Action);
        }
        if self.resources.is_empty() {
            return Some(Part::Unbound);
        }
        if !self.resources.iter().any(|g| g.matches(req.resource)) {
            return Some(Part::Resource);
        }
        self.conditions
            .iter()
            .position(|c| !c.holds(req))
            .map(Part::Condition)
    }

    fn describe(&self, part: Part, req: &Request<'_>) -> Mismatch {
        match part {
            Part::Action => Mismatch::Action,
            Part::Resource => Mismatch::Resource,
            Part::Unbound => Mismatch::Unbound {
                detail: self.unbound.clone(),
            },
            Part::Condition(i) => {
                let c = &self.conditions[i];
                Mismatch::Condition {
                    operator: c.operator.as_str().to_string(),
                    key: c.key.clone(),
                    detail: c.why_not(req),
                }
            }
        }
    }

    fn is_dead(&self) -> bool {
        self.actions.is_empty()
            || self.resources.is_empty()
            || self
                .conditions
                .iter()
                .any(|c| matches!(c.test, Test::Settled { holds: false, .. }))
    }
}

#[derive(Debug, Clone)]
struct BoundCondition {
    operator: Operator,
    key: String,
    test: Test,
}

#[derive(Debug, Clone)]
enum Test {
    /// String conditions involve only variables: settled at bind time.
    Settled {
        holds: bool,
        why_not: String,
    },
    Networks(Vec<Network>),
    Times(Vec<i64>),
}

impl BoundCondition {
    fn new(condition: &Condition, vars: &Variables) -> BoundCondition {
        let test = match &condition.values {
            ConditionValues::Networks(nets) => Test::Networks(nets.clone()),
            ConditionValues::Times(times) => Test::Times(times.clone()),
            ConditionValues::Strings(templates) => settle(
                condition.operator,
                vars.get(&condition.key),
                templates,
                vars,
            ),
        };
        BoundCondition {
            operator: condition.operator,
            key: condition.key.clone(),
            test,
        }
    }

    fn holds(&self, req: &Request<'_>) -> bool {
        match &self.test {
            Test::Settled { holds, .. } => *holds,
            Test::Networks(nets) => match req.source_ip {
                None => false,
                Some(ip) => {
                    let inside = nets.iter().any(|n| n.contains(ip));
                    inside == (self.operator == Operator::IpAddress)
                }
            },
            Test::Times(times) => times.iter().any(|&t| match self.operator {
                Operator::DateLessThan => req.now < t,
                _ => req.now > t,
            }),
        }
    }

    fn why_not(&self, req: &Request<'_>) -> String {
        match &self.test {
            Test::Settled { why_not, .. } => why_not.clone(),
            Test::Networks(_) => match req.source_ip {
                None => "the request has no source address".to_string(),
                Some(ip) if self.operator == Operator::IpAddress => {
                    format!("{} is in none of the networks", canonical_ip(ip))
                }
                Some(ip) => format!("{} is in one of the networks", canonical_ip(ip)),
            },
            Test::Times(_) => match self.operator {
                Operator::DateLessThan => format!("{} is not before any of the times", req.now),
                _ => format!("{} is not after any of the times", req.now),
            },
        }
    }
}

/// Decides a string condition for the values `have` of its key.
fn settle(
    operator: Operator,
    have: &[String],
    templates: &[crate::variables::Template],
    vars: &Variables,
) -> Test {
    let fail = |why: String| Test::Settled {
        holds: false,
        why_not: why,
    };
    if have.is_empty() {
        return fail("the key has no value".to_string());
    }
    let mut listed: Vec<String> = Vec::new();
    let mut lost = Vec::new();
    for template in templates {
        match template.expand(vars) {
            Expansion::Values(values) => listed.extend(values),
            Expansion::Nothing(why) => lost.push(why),
        }
    }
    if listed.is_empty() {
        return fail(format!(
            "no listed value is left after substitution ({})",
            lost.join("; ")
        ));
    }
    let any_match = match operator {
        Operator::StringEquals | Operator::StringNotEquals => {
            have.iter().any(|h| listed.iter().any(|l| l == h))
        }
        Operator::Bool => have
            .iter()
            .any(|h| listed.iter().any(|l| l.eq_ignore_ascii_case(h))),
        _ => {
            let globs: Vec<Glob> = listed.iter().map(|l| Glob::new(l)).collect();
            have.iter().any(|h| globs.iter().any(|g| g.matches(h)))
        }
    };
    let positive = matches!(
        operator,
        Operator::StringEquals | Operator::StringLike | Operator::Bool
    );
    if any_match == positive {
        Test::Settled {
            holds: true,
            why_not: String::new(),
        }
    } else if positive {
        fail(format!(
            "none of {} matches the listed values",
            quoted(have)
        ))
    } else {
        fail(format!("{} matches a listed value", quoted(have)))
    }
}

fn quoted(values: &[String]) -> String {
    values
        .iter()
        .map(|v| format!("\"{}\"", one_line(v)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {many}")
    }
}

/// `text` with control characters escaped, so that a reason stays one line.
fn one_line(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    text.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000; // 2027-01-15T08:00:00Z

    fn policy(doc: &str) -> Arc<Policy> {
        Arc::new(Policy::parse(doc).unwrap_or_else(|e| panic!("{e}\n{doc}")))
    }

    fn bound(docs: &[&str], vars: &Variables) -> Bound {
        let policies: Vec<(PolicyRef, Arc<Policy>)> = docs
            .iter()
            .enumerate()
            .map(|(i, doc)| {
                (
                    PolicyRef {
                        name: format!("p{i}"),
                        version: 1,
                    },
                    policy(doc),
                )
            })
            .collect();
        bind(&policies, vars)
    }

    fn allow(resource: &str) -> String {
        format!(
            r#"{{"Statement": {{"Effect": "Allow", "Action": "*", "Resource": "{resource}"}}}}"#
        )
    }

    fn allow_action(action: &str, resource: &str) -> String {
        format!(
            r#"{{"Statement": {{"Effect": "Allow", "Action": "{action}", "Resource": "{resource}"}}}}"#
        )
    }

    fn with_condition(condition: &str) -> String {
        format!(
            r#"{{"Statement": {{"Effect": "Allow", "Action": "*", "Resource": "*",
                "Condition": {condition}}}}}"#
        )
    }

    fn vars(pairs: &[(&str, &[&str])]) -> Variables {
        let mut v = Variables::new();
        for (name, values) in pairs {
            v.set(name, values.iter().map(|s| s.to_string()).collect());
        }
        v
    }

    fn req<'a>(action: &'a str, resource: &'a str) -> Request<'a> {
        Request {
            action,
            resource,
            source_ip: None,
            now: NOW,
        }
    }

    /// The decision, checked to agree with the allocation-free [`Bound::outcome`].
    fn allowed(b: &Bound, action: &str, resource: &str) -> bool {
        agreed(b, &req(action, resource))
    }

    fn agreed(b: &Bound, r: &Request<'_>) -> bool {
        let decision = b.decide(r);
        let outcome = b.outcome(r);
        assert_eq!(decision.allowed, outcome.allowed(), "{r:?}");
        let explicit = decision.by.as_ref().map(|s| s.effect);
        match outcome {
            Outcome::Allowed => assert_eq!(explicit, Some(Effect::Allow)),
            Outcome::Denied => assert_eq!(explicit, Some(Effect::Deny)),
            Outcome::Unmatched | Outcome::Refused => assert_eq!(explicit, None),
        }
        decision.allowed
    }

    #[test]
    fn actions_match_in_any_case_however_long() {
        let b = bound(
            &[&allow_action("MQTT:publish", "topic:a")],
            &Variables::new(),
        );
        assert!(allowed(&b, "mqtt:Publish", "topic:a"));
        assert!(allowed(&b, "MQTT:PUBLISH", "topic:a"));
        let long = format!("http:{}", "X".repeat(100));
        let b = bound(&[&allow_action(&long, "topic:a")], &Variables::new());
        assert!(allowed(&b, &long.to_lowercase(), "topic:a"));
        assert!(!allowed(&b, "mqtt:Publish", "topic:a"));
    }

    /// A policy as AWS IoT Core's documentation writes it: the same decisions as ours.
    #[test]
    fn a_policy_copied_from_aws_iot_core_decides_as_written() {
        let doc = r#"{
          "Version": "2012-10-17",
          "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect",
             "Resource": "arn:aws:iot:us-east-1:123456789012:client/${iot:Connection.Thing.ThingName}",
             "Condition": {"Bool": {"iot:Connection.Thing.IsAttached": "true"}}},
            {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
             "Resource": "arn:aws:iot:us-east-1:123456789012:topic/sensors/${iot:Certificate.Subject.CommonName}/*"},
            {"Effect": "Allow", "Action": "iot:Subscribe",
             "Resource": "arn:aws:iot:us-east-1:123456789012:topicfilter/sensors/${iot:ClientId}/#"},
            {"Effect": "Allow", "Action": ["iot:GetThingShadow", "iot:UpdateThingShadow"],
             "Resource": "arn:aws:iot:us-east-1:123456789012:thing/${iot:Connection.Thing.ThingName}"},
            {"Effect": "Deny", "Action": "iot:Publish",
             "Resource": "arn:aws:iot:*:*:topic/sensors/*/locked",
             "Condition": {"StringEquals": {"iot:Connection.Thing.Attributes[site]": "lyon"},
                           "IpAddress": {"aws:SourceIp": "10.0.0.0/8"}}}
          ]}"#;
        let attached = vars(&[
            ("cert:Subject.CN", &["pump-7"]),
            ("mqtt:ClientId", &["pump-7"]),
            ("thing:Name", &["pump-7"]),
            ("thing:IsAttached", &["true"]),
            ("thing:Attribute.site", &["lyon"]),
        ]);
        let b = bound(&[doc], &attached);
        assert!(allowed(&b, "mqtt:Connect", "client:pump-7"));
        assert!(!allowed(&b, "mqtt:Connect", "client:pump-8"));
        assert!(allowed(&b, "mqtt:Publish", "topic:sensors/pump-7/temp"));
        assert!(allowed(&b, "mqtt:Receive", "topic:sensors/pump-7/temp"));
        assert!(!allowed(&b, "mqtt:Publish", "topic:sensors/pump-8/temp"));
        assert!(allowed(
            &b,
            "mqtt:Subscribe",
            "topicfilter:sensors/pump-7/#"
        ));
        assert!(!allowed(&b, "mqtt:Subscribe", "topicfilter:sensors/+/#"));
        // aws:SourceIp is the connection's address.
        let locked = "topic:sensors/pump-7/locked";
        let inside = Request {
            source_ip: Some("10.1.2.3".parse().unwrap()),
            ..req("mqtt:Publish", locked)
        };
        assert!(!agreed(&b, &inside));
        let outside = Request {
            source_ip: Some("192.0.2.1".parse().unwrap()),
            ..req("mqtt:Publish", locked)
        };
        assert!(agreed(&b, &outside));
        // No HTTP action is granted by iot: actions.
        assert!(!allowed(&b, "http:GET", "topic:sensors/pump-7/temp"));
        // The shadow statement names nothing here, and says so.
        let trace = b.trace(&req("mqtt:Publish", "topic:x"));
        assert!(
            trace[3]
                .to_string()
                .contains("iot:GetThingShadow, iot:UpdateThingShadow name AWS"),
            "{}",
            trace[3]
        );
        let only_things = r#"{"Statement": {"Effect": "Allow", "Action": "iot:*",
            "Resource": "arn:aws:iot:us-east-1:1:thing/x"}}"#;
        let trace = bound(&[only_things], &attached).trace(&req("mqtt:Publish", "topic:x"));
        assert!(
            trace[0]
                .to_string()
                .contains("thing/x name AWS IoT resources"),
            "{}",
            trace[0]
        );
        // Not attached: Connect's Bool condition fails.
        let stranger = vars(&[
            ("cert:Subject.CN", &["pump-7"]),
            ("mqtt:ClientId", &["pump-7"]),
            ("thing:IsAttached", &["false"]),
        ]);
        let b = bound(&[doc], &stranger);
        assert!(!allowed(&b, "mqtt:Connect", "client:pump-7"));
        // Bool takes JSON's true too, and only true or false.
        let b = bound(
            &[&with_condition(r#"{"Bool": {"thing:IsAttached": true}}"#)],
            &attached,
        );
        assert!(allowed(&b, "mqtt:Connect", "client:x"));
        let e =
            Policy::parse(&with_condition(r#"{"Bool": {"thing:IsAttached": "yes"}}"#)).unwrap_err();
        assert!(e.message.contains("write \"true\" or \"false\""), "{e}");
    }

    #[test]
    fn deny_wins_over_allow() {
        let doc = r#"{"Statement": [
            {"Effect": "Allow", "Action": "http:*", "Resource": "route:api.example.com/*"},
            {"Sid": "no-deletes", "Effect": "Deny", "Action": "http:DELETE",
             "Resource": "route:api.example.com/*"},
            {"Effect": "Allow", "Action": "http:DELETE", "Resource": "route:api.example.com/x"}]}"#;
        let b = bind(
            &[(
                PolicyRef {
                    name: "partner-base".into(),
                    version: 2,
                },
                policy(doc),
            )],
            &Variables::new(),
        );
        let d = b.decide(&req("http:DELETE", "route:api.example.com/x"));
        assert!(!d.allowed);
        assert_eq!(
            d.reason,
            "denied by statement 1 (\"no-deletes\") of policy partner-base v2"
        );
        let by = d.by.unwrap();
        assert_eq!((by.index, by.effect), (1, Effect::Deny));
        assert_eq!(by.sid.as_deref(), Some("no-deletes"));

        let d = b.decide(&req("http:GET", "route:api.example.com/x"));
        assert!(d.allowed);
        assert_eq!(d.reason, "allowed by statement 0 of policy partner-base v2");

        // A Deny in a later policy still wins.
        let deny_all = r#"{"Statement": {"Effect": "Deny", "Action": "*", "Resource": "*"}}"#;
        let b = bound(&[&allow("*"), deny_all], &Variables::new());
        let d = b.decide(&req("http:GET", "route:a/b"));
        assert!(!d.allowed);
        assert_eq!(d.by.unwrap().policy, "p1");
    }

    #[test]
    fn without_an_applicable_allow_the_request_is_denied() {
        let b = bound(
            &[
                &allow("route:api.example.com/public/*"),
                &allow("topic:x"),
                &allow("client:y"),
            ],
            &Variables::new(),
        );
        let d = b.decide(&req("http:DELETE", "route:api.example.com/x"));
        assert_eq!(
            d,
            Decision {
                allowed: false,
                by: None,
                reason: "no statement of 3 policies allows http:DELETE on route:api.example.com/x"
                    .into(),
            }
        );
        let none = bind(&[], &Variables::new());
        assert!(!allowed(&none, "http:GET", "route:a/b"));
        assert!(none.is_empty());
        let d =
            bound(&[&allow("topic:x")], &Variables::new()).decide(&req("http:GET", "route:a/\nb"));
        assert_eq!(
            d.reason,
            "no statement of 1 policy allows http:GET on route:a/\\nb"
        );
    }

    #[test]
    fn common_name_gives_each_client_its_own_path() {
        let b = bound(
            &[&allow("route:api.example.com/devices/${cert:Subject.CN}/*")],
            &vars(&[("cert:Subject.CN", &["dev-1"])]),
        );
        assert!(allowed(
            &b,
            "http:GET",
            "route:api.example.com/devices/dev-1/state"
        ));
        assert!(!allowed(
            &b,
            "http:GET",
            "route:api.example.com/devices/dev-2/state"
        ));
        assert!(!allowed(
            &b,
            "http:GET",
            "route:api.example.com/devices/dev-1"
        ));
        // Resources match case-sensitively.
        assert!(!allowed(
            &b,
            "http:GET",
            "route:api.example.com/devices/DEV-1/state"
        ));
        assert!(!b.is_empty());
    }

    #[test]
    fn a_missing_variable_makes_the_statement_match_nothing() {
        let uses_org = "route:api.example.com/partners/${cert:Subject.O}/*";
        let b = bound(&[&allow(uses_org)], &vars(&[("cert:Subject.CN", &["x"])]));
        assert!(!allowed(
            &b,
            "http:GET",
            "route:api.example.com/partners//a"
        ));
        assert!(!allowed(
            &b,
            "http:GET",
            "route:api.example.com/partners/x/a"
        ));
        assert!(b.is_empty());
        let trace = b.trace(&req("http:GET", "route:api.example.com/partners/x/a"));
        assert_eq!(
            trace[0].failed,
            Some(Mismatch::Unbound {
                detail:
                    "${cert:Subject.O} has no usable value (none, empty, or holding one of * ? /)"
                        .into()
            })
        );

        // A Deny that names a missing variable does not apply either.
        let deny = format!(
            r#"{{"Statement": {{"Effect": "Deny", "Action": "*", "Resource": "{uses_org}"}}}}"#
        );
        let b = bound(&[&allow("*"), &deny], &Variables::new());
        assert!(allowed(
            &b,
            "http:GET",
            "route:api.example.com/partners/x/a"
        ));
    }

    #[test]
    fn a_wildcard_in_a_value_never_widens_a_match() {
        for cn in ["*", "?", "a*", "*/*", ""] {
            let v = vars(&[("cert:Subject.CN", &[cn])]);
            let b = bound(
                &[&allow("route:api.example.com/devices/${cert:Subject.CN}")],
                &v,
            );
            for resource in [
                "route:api.example.com/devices/x",
                "route:api.example.com/devices/",
                "route:api.example.com/devices/*",
                "route:api.example.com/devices/a*",
            ] {
                assert!(!allowed(&b, "http:GET", resource), "CN {cn:?} {resource}");
            }
            let b = bound(
                &[&with_condition(
                    r#"{"StringLike": {"thing:Name": "${cert:Subject.CN}"}}"#,
                )],
                &vars(&[("cert:Subject.CN", &[cn]), ("thing:Name", &["t"])]),
            );
            assert!(!allowed(&b, "http:GET", "route:a/b"), "CN {cn:?}");
        }
        // Among several values only the wildcard-free ones count.
        let v = vars(&[("cert:SAN.DNS", &["*.example.com", "a.example.com"])]);
        let b = bound(&[&allow("route:${cert:SAN.DNS}/*")], &v);
        assert!(allowed(&b, "http:GET", "route:a.example.com/x"));
        assert!(!allowed(&b, "http:GET", "route:b.example.com/x"));
        assert!(!allowed(&b, "http:GET", "route:*.example.com/x"));
    }

    #[test]
    fn any_of_several_san_values_matches() {
        let v = vars(&[("cert:SAN.DNS", &["a.example.com", "b.example.com"])]);
        let b = bound(&[&allow("route:${cert:SAN.DNS}/*")], &v);
        assert!(allowed(&b, "http:GET", "route:a.example.com/x"));
        assert!(allowed(&b, "http:GET", "route:b.example.com/y/z"));
        assert!(!allowed(&b, "http:GET", "route:c.example.com/x"));

        let b = bound(
            &[&with_condition(
                r#"{"StringEquals": {"cert:SAN.DNS": "b.example.com"}}"#,
            )],
            &v,
        );
        assert!(allowed(&b, "http:GET", "route:q/r"));
    }

    #[test]
    fn expansion_beyond_the_cap_matches_nothing() {
        let names: Vec<String> = (0..17).map(|i| format!("n{i}")).collect();
        let mut v = Variables::new();
        v.set("cert:SAN.DNS", names.clone());
        v.set("thing:Name", names);
        let pattern = "route:${cert:SAN.DNS}/${thing:Name}";
        let b = bound(&[&allow(pattern)], &v);
        assert!(!allowed(&b, "http:GET", "route:n1/n2"));
        let deny = format!(
            r#"{{"Statement": {{"Effect": "Deny", "Action": "*", "Resource": "{pattern}"}}}}"#
        );
        let b = bound(&[&allow("*"), &deny], &v);
        assert!(allowed(&b, "http:GET", "route:n1/n2"));
    }

    #[test]
    fn thing_attributes() {
        let doc = r#"{"Statement": {"Effect": "Allow", "Action": ["mqtt:Publish", "mqtt:Receive"],
            "Resource": "topic:sites/${thing:Attribute.site}/${thing:Name}/*",
            "Condition": {"StringEquals": {"thing:Attribute.tier": "gold"}}}}"#;
        let v = vars(&[
            ("thing:Name", &["pump-7"]),
            ("thing:Attribute.site", &["lyon"]),
            ("thing:Attribute.tier", &["gold"]),
        ]);
        let b = bound(&[doc], &v);
        assert!(allowed(&b, "mqtt:Publish", "topic:sites/lyon/pump-7/temp"));
        assert!(!allowed(
            &b,
            "mqtt:Publish",
            "topic:sites/paris/pump-7/temp"
        ));
        assert!(!allowed(
            &b,
            "mqtt:Subscribe",
            "topic:sites/lyon/pump-7/temp"
        ));
        let mut silver = v.clone();
        silver.set("thing:Attribute.tier", vec!["silver".into()]);
        assert!(!allowed(
            &bound(&[doc], &silver),
            "mqtt:Publish",
            "topic:sites/lyon/pump-7/t"
        ));
        let mut no_tier = v;
        no_tier.set("thing:Attribute.tier", Vec::new());
        let b = bound(&[doc], &no_tier);
        assert!(!allowed(&b, "mqtt:Publish", "topic:sites/lyon/pump-7/t"));
        assert!(b.is_empty());
    }

    #[test]
    fn string_conditions() {
        let v = vars(&[
            ("cert:Subject.O", &["acme"]),
            ("cert:Subject.OU", &["payments"]),
            ("thing:Attribute.org", &["acme"]),
        ]);
        let cases = [
            (
                r#"{"StringEquals": {"cert:Subject.OU": ["payments", "treasury"]}}"#,
                true,
            ),
            (
                r#"{"StringEquals": {"cert:Subject.OU": "Payments"}}"#,
                false,
            ),
            (
                r#"{"StringNotEquals": {"cert:Subject.OU": ["hr", "it"]}}"#,
                true,
            ),
            (
                r#"{"StringNotEquals": {"cert:Subject.OU": ["hr", "payments"]}}"#,
                false,
            ),
            (r#"{"StringLike": {"cert:Subject.OU": "pay*"}}"#, true),
            (r#"{"StringLike": {"cert:Subject.OU": "p?yments"}}"#, true),
            (r#"{"StringLike": {"cert:Subject.OU": "*x*"}}"#, false),
            (r#"{"StringNotLike": {"cert:Subject.OU": "*x*"}}"#, true),
            (
                r#"{"StringNotLike": {"cert:Subject.OU": ["*x*", "pay*"]}}"#,
                false,
            ),
            // Values may use variables.
            (
                r#"{"StringEquals": {"cert:Subject.O": "${thing:Attribute.org}"}}"#,
                true,
            ),
            (
                r#"{"StringLike": {"cert:Subject.OU": "${cert:Subject.OU}*"}}"#,
                true,
            ),
            (
                r#"{"StringEquals": {"cert:Subject.O": "${thing:Name}"}}"#,
                false,
            ),
            (
                r#"{"StringNotEquals": {"cert:Subject.O": "${thing:Name}"}}"#,
                false,
            ),
            (
                r#"{"StringEquals": {"cert:Subject.O": ["${thing:Name}", "acme"]}}"#,
                true,
            ),
            // A key without a value fails every operator, the negative ones included.
            (r#"{"StringEquals": {"cert:Subject.C": "FR"}}"#, false),
            (r#"{"StringNotEquals": {"cert:Subject.C": "FR"}}"#, false),
            (r#"{"StringLike": {"cert:Subject.C": "*"}}"#, false),
            (r#"{"StringNotLike": {"cert:Subject.C": "FR"}}"#, false),
            // Every condition must hold.
            (
                r#"{"StringEquals": {"cert:Subject.O": "acme", "cert:Subject.OU": "hr"}}"#,
                false,
            ),
            (
                r#"{"StringEquals": {"cert:Subject.O": "acme"},
                    "StringLike": {"cert:Subject.OU": "pay*"}}"#,
                true,
            ),
        ];
        for (condition, want) in cases {
            let b = bound(&[&with_condition(condition)], &v);
            assert_eq!(allowed(&b, "http:GET", "route:a/b"), want, "{condition}");
        }
    }

    #[test]
    fn address_conditions() {
        let ip4 = r#"{"IpAddress": {"conn:SourceIp": ["10.0.0.0/8", "192.0.2.7"]}}"#;
        let ip6 = r#"{"IpAddress": {"conn:SourceIp": "2001:db8::/32"}}"#;
        let not = r#"{"NotIpAddress": {"conn:SourceIp": ["10.0.0.0/8", "2001:db8::/32"]}}"#;
        let cases = [
            (ip4, Some("10.1.2.3"), true),
            (ip4, Some("192.0.2.7"), true),
            (ip4, Some("192.0.2.8"), false),
            (ip4, Some("::ffff:10.1.2.3"), true),
            (ip4, Some("2001:db8::1"), false),
            (ip4, None, false),
            (ip6, Some("2001:db8:5::1"), true),
            (ip6, Some("2001:db9::1"), false),
            (ip6, Some("10.1.2.3"), false),
            (not, Some("172.16.0.1"), true),
            (not, Some("10.0.0.1"), false),
            (not, Some("2001:db8::1"), false),
            (not, Some("::1"), true),
            (not, None, false),
        ];
        for (condition, ip, want) in cases {
            let b = bound(&[&with_condition(condition)], &Variables::new());
            let r = Request {
                source_ip: ip.map(|s| s.parse().unwrap()),
                ..req("http:GET", "route:a/b")
            };
            assert_eq!(agreed(&b, &r), want, "{condition} {ip:?}");
        }
    }

    #[test]
    fn date_conditions() {
        let before = r#"{"DateLessThan": {"conn:CurrentTime": "2027-01-01T00:00:00Z"}}"#;
        let after = r#"{"DateGreaterThan": {"conn:CurrentTime": "2027-01-01T01:00:00+01:00"}}"#;
        let new_year = 1_798_761_600;
        for (condition, now, want) in [
            (before, new_year - 1, true),
            (before, new_year, false),
            (before, new_year + 1, false),
            (after, new_year - 1, false),
            (after, new_year, false),
            (after, new_year + 1, true),
        ] {
            let b = bound(&[&with_condition(condition)], &Variables::new());
            let r = Request {
                now,
                ..req("http:GET", "route:a/b")
            };
            assert_eq!(agreed(&b, &r), want, "{condition} at {now}");
        }
    }

    #[test]
    fn actions_match_case_insensitively() {
        let doc = r#"{"Statement": [
            {"Effect": "Allow", "Action": ["HTTP:get", "mqtt:publish"], "Resource": "*"}]}"#;
        let b = bound(&[doc], &Variables::new());
        assert!(allowed(&b, "http:GET", "route:a/b"));
        assert!(allowed(&b, "Http:Get", "route:a/b"));
        assert!(allowed(&b, "MQTT:Publish", "topic:t"));
        assert!(!allowed(&b, "http:POST", "route:a/b"));
        assert!(!allowed(&b, "mqtt:Subscribe", "topicfilter:t"));
        let b = bound(
            &[r#"{"Statement": {"Effect": "Allow", "Action": "http:P*", "Resource": "*"}}"#],
            &Variables::new(),
        );
        assert!(allowed(&b, "http:put", "route:a/b"));
        assert!(allowed(&b, "http:PATCH", "route:a/b"));
        assert!(!allowed(&b, "http:GET", "route:a/b"));
        assert!(!allowed(&b, "mqtt:Publish", "topic:t"));
    }

    #[test]
    fn trace_names_the_part_that_failed() {
        let doc = r#"{"Statement": [
            {"Sid": "read", "Effect": "Allow", "Action": "http:GET", "Resource": "route:a/*"},
            {"Effect": "Allow", "Action": "http:POST", "Resource": "route:b/*"},
            {"Effect": "Allow", "Action": "http:POST", "Resource": "route:a/*",
             "Condition": {"StringEquals": {"cert:Subject.OU": "ops"},
                           "IpAddress": {"conn:SourceIp": "10.0.0.0/8"}}},
            {"Effect": "Deny", "Action": "http:POST", "Resource": "route:a/*",
             "Condition": {"IpAddress": {"conn:SourceIp": "192.0.2.0/24"}}},
            {"Effect": "Allow", "Action": "*", "Resource": "route:a/${cert:Subject.O}"}]}"#;
        let v = vars(&[("cert:Subject.OU", &["ops"])]);
        let b = bound(&[doc], &v);
        let r = Request {
            source_ip: Some("172.16.0.1".parse().unwrap()),
            ..req("http:POST", "route:a/x")
        };
        let trace = b.trace(&r);
        let failed: Vec<Option<Mismatch>> = trace.iter().map(|t| t.failed.clone()).collect();
        assert_eq!(failed[0], Some(Mismatch::Action));
        assert_eq!(failed[1], Some(Mismatch::Resource));
        assert_eq!(
            failed[2],
            Some(Mismatch::Condition {
                operator: "IpAddress".into(),
                key: "conn:SourceIp".into(),
                detail: "172.16.0.1 is in none of the networks".into(),
            })
        );
        assert!(matches!(failed[3], Some(Mismatch::Condition { .. })));
        assert!(matches!(failed[4], Some(Mismatch::Unbound { .. })));
        assert!(trace.iter().all(|t| !t.applied));
        assert_eq!(
            trace[0].to_string(),
            "statement 0 (\"read\") of policy p0 v1 [Allow]: does not apply: no Action pattern \
             matches the action"
        );

        let r = Request {
            source_ip: Some("10.0.0.1".parse().unwrap()),
            ..r
        };
        let trace = b.trace(&r);
        assert!(trace[2].applied && trace[2].failed.is_none());
        assert!(agreed(&b, &r));
        assert_eq!(
            serde_json::to_value(&trace[1]).unwrap(),
            serde_json::json!({
                "statement": {"policy": "p0", "version": 1, "index": 1, "sid": null,
                              "effect": "Allow"},
                "applied": false,
                "failed": {"part": "resource"}
            })
        );
        let r = Request {
            source_ip: Some("192.0.2.1".parse().unwrap()),
            ..r
        };
        assert_eq!(
            serde_json::to_value(b.decide(&r)).unwrap(),
            serde_json::json!({
                "allowed": false,
                "by": {"policy": "p0", "version": 1, "index": 3, "sid": null, "effect": "Deny"},
                "reason": "denied by statement 3 of policy p0 v1"
            })
        );
    }

    #[test]
    fn settled_string_conditions_are_explained() {
        let b = bound(
            &[&with_condition(
                r#"{"StringEquals": {"cert:Subject.OU": "ops"}}"#,
            )],
            &vars(&[("cert:Subject.OU", &["dev"])]),
        );
        assert!(b.is_empty());
        let trace = b.trace(&req("http:GET", "route:a/b"));
        assert_eq!(
            trace[0].failed,
            Some(Mismatch::Condition {
                operator: "StringEquals".into(),
                key: "cert:Subject.OU".into(),
                detail: "none of \"dev\" matches the listed values".into(),
            })
        );
    }

    #[test]
    fn grpc_calls_are_named_by_service_and_method() {
        let b = bound(
            &[r#"{"Statement": [
                {"Effect": "Allow", "Action": "grpc:Invoke", "Resource": "grpc:billing.v1.Invoices/*"},
                {"Effect": "Deny", "Action": "grpc:*", "Resource": "grpc:billing.v1.Invoices/Delete"}]}"#],
            &Variables::new(),
        );
        assert!(allowed(&b, "grpc:Invoke", "grpc:billing.v1.Invoices/Get"));
        assert!(!allowed(
            &b,
            "grpc:Invoke",
            "grpc:billing.v1.Invoices/Delete"
        ));
        assert!(!allowed(&b, "grpc:Invoke", "grpc:billing.v2.Invoices/Get"));
        assert!(!allowed(&b, "http:POST", "grpc:billing.v1.Invoices/Get"));
    }
}
