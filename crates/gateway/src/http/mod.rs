//! HTTP after the handshake: what a request handler knows (`context`), request screening
//! (`inbound`), the one decision (`decide`), the HTTP/1.1 fast path (`fast`), the hyper path
//! (`service`, `proxy`, `h2guard`), identity headers, access logs and gateway-made answers.
//!
//! Invariant: nothing here names `conn`; connections hand their stream and context in.

pub(crate) mod access_log;
pub(crate) mod coalesce;
pub(crate) mod context;
pub(crate) mod decide;
pub(crate) mod est;
pub(crate) mod fast;
pub(crate) mod grpc;
pub(crate) mod h2guard;
pub(crate) mod h2up;
pub(crate) mod identity;
pub(crate) mod inbound;
pub(crate) mod provisioning;
pub(crate) mod proxy;
pub(crate) mod respond;
pub(crate) mod route;
pub(crate) mod scep;
pub(crate) mod service;
pub(crate) mod streams;
pub(crate) mod token;
