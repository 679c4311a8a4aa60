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

use crate::respond::{Body, full};

/// Binds the echo upstream on `addr` (use port 0 for any) and serves it in the background.
pub async fn spawn_echo(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(echo))
                    .await;
            });
        }
    });
    Ok(local)
}

async fn echo(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
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
