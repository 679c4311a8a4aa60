//! The general HTTP path on hyper (HTTP/1.1 after the fast path hands over, and HTTP/2):
//! screen, decide, forward or answer, and the access log line when the body ends.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};

use crate::DomainState;
use crate::config::Authorization;
use crate::http::access_log::AccessLog;
use crate::http::context::{ConnectionContext, admit};
use crate::http::decide::{Refusal, normalize_host};
use crate::http::h2up::TrailerScreen;
use crate::http::proxy::{MappingClient, Origin, Outgoing, Upstream, forward};
use crate::http::respond::{Body, error_response, escape};
use crate::verdict::ClientVerdict;

pub(crate) async fn request(
    mut req: Request<Incoming>,
    ctx: Arc<ConnectionContext>,
) -> Response<Body> {
    let began = Began {
        at: Instant::now(),
        grpc: crate::http::grpc::is_grpc(req.headers()),
    };
    let grpc = began.grpc;
    let domain: &DomainState = &ctx.state.domains[ctx.domain];
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let screened = crate::http::inbound::screen(
        &mut req,
        &ctx.state.identity,
        domain.config.underscores_in_headers,
    );
    let websocket = match screened {
        Ok(websocket) => websocket,
        Err(refused) => {
            tracing::info!(target: "portcullis::connection", peer = %ctx.peer, domain = %domain.config.hostname, result = "refused", reason = refused.code, "{}", refused.message);
            let mut response = error_response(refused.status, refused.code, &refused.message, None);
            // The request's framing or target is in doubt: nothing more is read from this
            // connection (HTTP/2 closes only the stream).
            if req.version() < hyper::Version::HTTP_2 {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return finish(
                &ctx,
                &began,
                String::new(),
                method,
                path,
                Some(refused.code.to_string()),
                response,
            );
        }
    };
    let host = request_host(&req);
    let mapping_name = |index: Option<usize>| {
        index
            .and_then(|i| domain.config.mappings.get(i))
            .map(|m| m.base_path.clone())
            .unwrap_or_default()
    };
    let mut denied: Option<String> = None;
    let admitted = admit(
        &ctx,
        method.as_str(),
        &path,
        req.uri().query(),
        &host,
        websocket.is_some(),
        grpc,
    );
    let (mapping_name, response) = match admitted {
        Ok(admitted) => {
            let mapping = &domain.config.mappings[admitted.index];
            let forwarded_host = admitted.forwarded_host(&host, domain);
            let identity = ctx.identity_headers();
            let out = Outgoing {
                origin: Origin {
                    forwarding: &ctx.forwarding,
                    host: &forwarded_host,
                },
                identity: &identity,
                policy: mapping.authorization == Authorization::Policy,
                websocket,
                tunnel: &ctx.tunnel,
                protocol: mapping.upstream_protocol,
                screen: TrailerScreen {
                    state: &ctx.state,
                    underscores: domain.config.underscores_in_headers,
                    policy: mapping.authorization == Authorization::Policy,
                },
            };
            // A gRPC call's own deadline may shorten the wait for the upstream's answer, never
            // lengthen it past the operator's limit (a client cannot hold a stream open longer).
            let limit = ctx.state.limits.upstream_response_timeout;
            let timeout = match grpc
                .then(|| crate::http::grpc::timeout(req.headers()))
                .flatten()
            {
                Some(deadline) => deadline.min(limit),
                None => limit,
            };
            let client = domain
                .upstream_clients
                .get(admitted.index)
                .and_then(Option::as_ref)
                .map_or(Upstream::Http1(&ctx.client), MappingClient::upstream);
            (
                mapping.base_path.clone(),
                forward(client, req, &mapping.upstream, &admitted.rest, out, timeout).await,
            )
        }
        Err((refusal, index)) => {
            let name = mapping_name(index);
            let response = match refusal {
                Refusal::Misdirected => error_response(
                    StatusCode::MISDIRECTED_REQUEST,
                    "misdirected-request",
                    "the Host header does not match the domain this connection was made for",
                    None,
                ),
                // HTTPS publish to MQTT subscribers, like IoT Core's HTTPS endpoint.
                Refusal::HttpsPublish => {
                    let leaf = match &ctx.verdict {
                        ClientVerdict::Valid(chain) => chain.first(),
                        _ => None,
                    };
                    let response = match leaf {
                        None => forbidden(&req, &ctx.verdict, advice_of(&ctx)),
                        Some(leaf) => {
                            crate::mqtt::https_publish(
                                req,
                                leaf,
                                &domain.tls.verifier,
                                &domain.config,
                                &ctx.broker,
                                ctx.peer,
                            )
                            .await
                        }
                    };
                    return finish(&ctx, &began, "/topics".into(), method, path, None, response);
                }
                Refusal::AmbiguousPath(why) => {
                    denied = Some("ambiguous-path".to_string());
                    error_response(StatusCode::BAD_REQUEST, "ambiguous-path", &why, None)
                }
                Refusal::NoRoute => error_response(
                    StatusCode::NOT_FOUND,
                    "no-route",
                    "no mapping matches this path",
                    None,
                ),
                Refusal::NeedsCertificate => forbidden(&req, &ctx.verdict, advice_of(&ctx)),
                Refusal::NoHost => {
                    denied = Some("no-host".to_string());
                    error_response(
                        StatusCode::BAD_REQUEST,
                        "no-host",
                        "policy-authorized routes need a Host header",
                        None,
                    )
                }
                Refusal::Builtin(builtin) => {
                    let base = index
                        .map(|i| domain.config.mappings[i].base_path.as_str())
                        .unwrap_or_default();
                    let rest = path.strip_prefix(base).unwrap_or(&path).to_string();
                    let response = match &ctx.verdict {
                        ClientVerdict::Valid(chain) if !chain.is_empty() => match builtin {
                            crate::config::Builtin::Provisioning => {
                                super::provisioning::answer(
                                    req,
                                    &chain[0],
                                    &rest,
                                    &domain.tls.verifier,
                                    &domain.config,
                                    ctx.peer,
                                )
                                .await
                            }
                            crate::config::Builtin::Token => {
                                let Some(mapping) = index.map(|i| &domain.config.mappings[i])
                                else {
                                    return finish(
                                        &ctx,
                                        &began,
                                        name,
                                        method,
                                        path,
                                        None,
                                        error_response(
                                            StatusCode::NOT_FOUND,
                                            "no-route",
                                            "no mapping",
                                            None,
                                        ),
                                    );
                                };
                                super::token::answer(
                                    req,
                                    &chain[0],
                                    &rest,
                                    mapping,
                                    &domain.tls.verifier,
                                    &domain.config,
                                    ctx.peer,
                                )
                                .await
                            }
                            crate::config::Builtin::Est => {
                                super::est::answer(
                                    req,
                                    Some(&chain[0]),
                                    &rest,
                                    &domain.tls.verifier,
                                    ctx.peer,
                                )
                                .await
                            }
                            crate::config::Builtin::Scep => {
                                super::scep::answer(req, &domain.tls.verifier, ctx.peer).await
                            }
                        },
                        // Expired within its grace period: EST re-enrollment only.
                        ClientVerdict::Rejected { .. }
                            if builtin == crate::config::Builtin::Est
                                && ctx.verdict.renew_only().is_some() =>
                        {
                            super::est::renew_only(
                                req,
                                ctx.verdict.renew_only(),
                                &rest,
                                &domain.tls.verifier,
                                ctx.peer,
                            )
                            .await
                        }
                        // SCEP messages carry their own signature and authorization.
                        ClientVerdict::None if builtin == crate::config::Builtin::Scep => {
                            super::scep::answer(req, &domain.tls.verifier, ctx.peer).await
                        }
                        // EST enrolls a device with no certificate yet by a one-time code.
                        ClientVerdict::None if builtin == crate::config::Builtin::Est => {
                            super::est::answer(req, None, &rest, &domain.tls.verifier, ctx.peer)
                                .await
                        }
                        _ => forbidden(&req, &ctx.verdict, advice_of(&ctx)),
                    };
                    return finish(&ctx, &began, name, method, path, None, response);
                }
                Refusal::ClaimCertificate => {
                    denied = Some("claim-certificate".to_string());
                    error_response(
                        StatusCode::FORBIDDEN,
                        "claim-certificate",
                        "a claim certificate may only provision a device: connect with the device's own certificate",
                        None,
                    )
                }
                Refusal::UpgradeNotAllowed => {
                    denied = Some("upgrade-refused".to_string());
                    error_response(
                        StatusCode::BAD_REQUEST,
                        "upgrade-refused",
                        "this mapping does not tunnel WebSocket connections",
                        None,
                    )
                }
                Refusal::PolicyDenied(reason) => {
                    let page = forbidden_page(
                        &req,
                        "policy-denied",
                        &format!("Access denied: {reason}."),
                        ctx.verdict.leaf(),
                        advice_of(&ctx),
                    );
                    denied = Some(reason);
                    page
                }
            };
            (name, response)
        }
    };
    finish(&ctx, &began, mapping_name, method, path, denied, response)
}

/// When a request began, and whether it is a gRPC call (answered with gRPC statuses).
struct Began {
    at: Instant,
    grpc: bool,
}

/// Records a request's metrics and arranges its access-log line (written when the body has been
/// sent or abandoned, with its size).
fn finish(
    ctx: &Arc<ConnectionContext>,
    began: &Began,
    mapping: String,
    method: hyper::Method,
    path: String,
    denied: Option<String>,
    response: Response<Body>,
) -> Response<Body> {
    // A gRPC client gets the gateway's own answers as gRPC statuses; the log and the metrics
    // keep the decision's HTTP status.
    let started = began.at;
    let response = if began.grpc {
        crate::http::grpc::convert(response)
    } else {
        response
    };
    let status = response
        .extensions()
        .get::<crate::http::grpc::DecidedStatus>()
        .map_or(response.status(), |d| d.0)
        .as_u16();
    ctx.state.domains[ctx.domain]
        .request_metrics(&mapping, status)
        .record(started.elapsed().as_secs_f64());
    if !tracing::enabled!(target: "portcullis::access", tracing::Level::INFO) {
        return response;
    }
    let log = AccessLog {
        ctx: ctx.clone(),
        mapping,
        method,
        path,
        status,
        denied,
        headers_ms: started.elapsed().as_secs_f64() * 1000.0,
        started,
    };
    response.map(|body| {
        BoxBody::new(LoggedBody {
            inner: body,
            bytes: 0,
            log: Some(log),
        })
    })
}

/// A response body that counts what it sends and writes the access line at its end.
struct LoggedBody {
    inner: Body,
    bytes: u64,
    log: Option<AccessLog>,
}

impl hyper::body::Body for LoggedBody {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => {
                if let Some(log) = this.log.take() {
                    log.emit(this.bytes, true);
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(log) = self.log.take() {
            let complete = hyper::body::Body::is_end_stream(&self.inner);
            log.emit(self.bytes, complete);
        }
    }
}

/// The Host of a request: HTTP/2's :authority or the Host header, lower-case, without port.
fn request_host(req: &Request<Incoming>) -> String {
    req.uri()
        .authority()
        .map(|a| a.host())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .map(normalize_host)
        .unwrap_or_default()
}

/// 403 with the reason: JSON for programs, a readable page for browsers.
fn forbidden(
    req: &Request<Incoming>,
    verdict: &ClientVerdict,
    advice: Option<&str>,
) -> Response<Body> {
    let (code, message) = match verdict {
        ClientVerdict::None => (
            "no-certificate",
            "This service requires a client certificate, and none was presented.".to_string(),
        ),
        ClientVerdict::Rejected {
            reason,
            explanation,
            ..
        } => (
            reason.code(),
            format!("The client certificate was rejected: {explanation}."),
        ),
        ClientVerdict::Valid(_) => ("forbidden", "Access denied.".to_string()),
    };
    forbidden_page(req, code, &message, verdict.leaf(), advice)
}

/// The domain's failure-page advice.
fn advice_of(ctx: &ConnectionContext) -> Option<&str> {
    ctx.state.domains[ctx.domain]
        .config
        .mtls
        .failure_advice
        .as_deref()
}

/// 403 with `code` and `message`: JSON for programs, a readable page (with the certificate
/// presented, if any) for browsers.
fn forbidden_page(
    req: &Request<Incoming>,
    code: &str,
    message: &str,
    leaf: Option<&portcullis_pki::Certificate>,
    advice: Option<&str>,
) -> Response<Body> {
    let wants_html = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if !wants_html {
        let mut resp = error_response(StatusCode::FORBIDDEN, code, message, None);
        if let Ok(v) = HeaderValue::from_str(code) {
            resp.headers_mut().insert("x-portcullis-reason", v);
        }
        return resp;
    }
    let info = leaf.map(portcullis_pki::Certificate::info);
    let presented = info.map(|i| crate::http::respond::Presented {
        subject: &i.subject,
        issuer: &i.issuer,
        not_after: &i.not_after,
        expired: i.not_after_unix() < time::OffsetDateTime::now_utc().unix_timestamp(),
    });
    let advice = match advice {
        // The domain's own words: plain text, escaped, one paragraph per blank-line block.
        Some(text) => {
            let paragraphs: String = text
                .split("\n\n")
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| format!("<p>{}</p>", escape(p)))
                .collect();
            format!("<h2>What to do</h2>{paragraphs}")
        }
        None => "<h2>What to do</h2><p>Use a device with a certificate issued for this service, or ask your administrator for one. \
                 If your browser asked you to choose a certificate, restart it and choose again.</p>"
            .to_string(),
    };
    let page = crate::http::respond::failure_page(
        StatusCode::FORBIDDEN,
        code,
        message,
        presented.as_ref(),
        &advice,
    );
    let mut resp = Response::new(crate::http::respond::full(page));
    *resp.status_mut() = StatusCode::FORBIDDEN;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
    );
    if let Ok(v) = HeaderValue::from_str(code) {
        headers.insert("x-portcullis-reason", v);
    }
    resp
}
