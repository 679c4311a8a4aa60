//! The Portcullis policy engine: which requests a client certificate may make.
//!
//! Policies are JSON documents in the manner of AWS IoT Core policies. A policy is a list of
//! statements; each statement has an effect (`Allow` or `Deny`), Action patterns
//! (`http:GET`, `mqtt:Publish`, `http:*`…), Resource patterns (`route:<domain>/<path>`,
//! `client:<id>`, `topic:<name>`, `topicfilter:<filter>`) and optional conditions. Patterns use
//! `*` (any sequence, `/` included) and `?` (one character). Resource patterns and condition
//! values may use variables taken from the connection, such as `${cert:Subject.CN}` or
//! `${thing:Attribute.site}`, so that one policy can give every device its own resources:
//!
//! ```json
//! {"Version": "2012-10-17",
//!  "Statement": [{"Effect": "Allow", "Action": "http:GET",
//!                 "Resource": "route:api.example.com/partners/${cert:Subject.O}/*"}]}
//! ```
//!
//! A request is allowed when some statement allows it and none denies it: an explicit Deny
//! wins, and no applicable Allow means deny. A variable that has no value, or whose value
//! holds a wildcard, never widens a pattern: the pattern that uses it matches nothing.
//!
//! Evaluation has three stages, each done as rarely as possible:
//!
//! - [`Policy::parse`] (in [`document`]) checks a document completely when it is stored, so
//!   errors reach the operator, with the place (`Statement[1].Resource[0]`) and the fix, and
//!   never a device.
//! - [`bind`] (in [`decide`]) takes the policies attached to one connection and its
//!   [`Variables`] (from the certificate with [`Variables::from_certificate`], plus the thing
//!   and MQTT client id), substitutes and compiles everything once per connection.
//! - [`Bound::decide`] answers each [`Request`] with a [`Decision`] naming the statement that
//!   decided; [`Bound::trace`] shows how every statement fared, for `explain` and
//!   `policy simulate`.
//!
//! [`context`] says which policies apply to a subject (certificate, things, CA, domain) and
//! with which variables: the gateway and the admin API's simulation both use it.
//!
//! [`glob`] holds the pattern matcher, linear in practice and never exponential, which the MQTT
//! endpoint reuses for topics.
#![forbid(unsafe_code)]

pub mod context;
pub mod decide;
pub mod document;
pub mod glob;
mod variables;

pub use decide::{
    Bound, Decision, Mismatch, Outcome, PolicyRef, Request, StatementRef, StatementTrace, bind,
};
pub use document::{
    Effect, MAX_DOCUMENT_BYTES, MAX_PATTERN_BYTES, MAX_PATTERNS, MAX_STATEMENTS, Policy,
    PolicyError, Statement,
};
pub use glob::{Glob, glob_match};
pub use variables::{
    MAX_EXPANSION, NAME_ATTRIBUTES, VARIABLE_NAMES, VARIABLES_ARE, Variables, canonical_variable,
    is_variable_name, unknown_variable,
};
