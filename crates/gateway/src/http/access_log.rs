//! The access log: one line per request, written when its body has been sent or abandoned.

use std::sync::Arc;
use std::time::Instant;

use crate::http::context::ConnectionContext;

/// What the access-log line of one request says, less the byte count.
pub(crate) struct AccessLog {
    pub(crate) ctx: Arc<ConnectionContext>,
    pub(crate) mapping: String,
    pub(crate) method: hyper::Method,
    pub(crate) path: String,
    pub(crate) status: u16,
    /// Why an authorization refused the request.
    pub(crate) denied: Option<String>,
    pub(crate) headers_ms: f64,
    pub(crate) started: Instant,
}

impl AccessLog {
    pub(crate) fn emit(self, bytes: u64, complete: bool) {
        let ctx = &self.ctx;
        let leaf = ctx.verdict.leaf().map(|c| c.info());
        tracing::info!(
            target: "portcullis::access",
            peer = %ctx.peer,
            domain = %ctx.state.domains[ctx.domain].config.hostname,
            mapping = %self.mapping,
            method = %self.method,
            path = %self.path,
            status = self.status,
            headers_ms = self.headers_ms,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            response_bytes = bytes,
            complete,
            client_subject = leaf.map(|l| l.subject.as_str()).unwrap_or(""),
            client_serial = leaf.map(|l| l.serial.as_str()).unwrap_or(""),
            client_fingerprint = leaf.map(|l| l.id.as_str()).unwrap_or(""),
            verify = %ctx.verdict.status(),
            denied = self.denied.as_deref().unwrap_or(""),
            "request"
        );
    }
}
