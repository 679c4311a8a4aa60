//! The built-in echo upstream: answers every request with what it received, as JSON, so that a
//! quickstart (and the tests) can see the identity the gateway forwarded.

use std::convert::Infallible;
use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;

use crate::http::respond::{Body, full};

/// Binds the echo upstream on `addr` (use port 0 for any) and serves it in the background.
pub async fn spawn_echo(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Back off instead of spinning when accepting fails (out of descriptors).
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(echo))
                    .with_upgrades()
                    .await;
            });
        }
    });
    Ok(local)
}

async fn echo(mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if let Some(key) = req.headers().get("sec-websocket-key").cloned()
        && req
            .headers()
            .get(hyper::header::UPGRADE)
            .is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"websocket"))
    {
        // A WebSocket handshake: accept it, then echo every byte back (enough to prove the
        // tunnel; frames are not parsed).
        let upgraded = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(io) = upgraded.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(io));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut resp = Response::new(full(""));
        *resp.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert(
            hyper::header::UPGRADE,
            hyper::header::HeaderValue::from_static("websocket"),
        );
        h.insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("upgrade"),
        );
        if let Ok(v) = hyper::header::HeaderValue::from_str(
            &crate::http::inbound::websocket_accept(key.as_bytes()),
        ) {
            h.insert("sec-websocket-accept", v);
        }
        return Ok(resp);
    }
    let mut headers = Map::new();
    let mut identity = Map::new();
    for (name, value) in req.headers() {
        let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
        if name.as_str().starts_with("x-client-cert-") || name.as_str().starts_with("client-cert") {
            identity.insert(name.as_str().to_string(), Value::String(text.clone()));
        }
        match headers.get_mut(name.as_str()) {
            Some(Value::String(prior)) => {
                prior.push_str(", ");
                prior.push_str(&text);
            }
            _ => {
                headers.insert(name.as_str().to_string(), Value::String(text));
            }
        }
    }
    let body = json!({
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": req.uri().query(),
        "identity": identity,
        "headers": headers,
    });
    let mut resp = Response::new(full(format!("{body:#}\n")));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}
