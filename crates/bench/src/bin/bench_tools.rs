//! Helpers for `bench/run.sh` and `bench/instructions.sh`, in one program:
//!
//!   bench_tools cas N OUT
//!       N self-signed ECDSA P-256 CA certificates in one PEM file (a large truststore).
//!   bench_tools bare ADDR CERT KEY CA tls13|tls12
//!       The ceiling: a bare rustls server (aws-lc-rs, one thread) that verifies the client
//!       certificate against CA (WebPkiClientVerifier, no session resumption), then answers every
//!       HTTP/1.1 request on the connection with a fixed `200 ok` and does nothing else.
//!   bench_tools grpc-echo ADDR
//!       A gRPC upstream speaking h2c (one thread): every call is answered with the message it
//!       carried and `grpc-status: 0` in trailers.
//!   bench_tools idle ADDR HOST CA CERT KEY N SECONDS
//!       Opens N mutual-TLS connections to ADDR (SNI HOST), sends one keep-alive request on each
//!       and reads the answer, prints `ready N` when all are up and holds them SECONDS.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use portcullis_pki::issue::{IssueRequest, Profile, SubjectName, issue};
use portcullis_pki::key::{KeyType, PrivateKey};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn certs(path: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .map(Result::unwrap)
        .collect()
}

fn roots(path: &str) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(path) {
        roots.add(c).unwrap();
    }
    roots
}

fn cas(n: usize, out: &str) {
    let mut pem = String::new();
    for i in 0..n {
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let req = IssueRequest::new(
            Profile::RootCa,
            SubjectName::cn(format!("Bench Truststore CA {i}")),
        );
        pem.push_str(&issue(&req, &key, None).unwrap().to_pem());
    }
    std::fs::write(out, pem).unwrap();
}

async fn bare(addr: &str, cert: &str, key: &str, ca: &str, version: &str) {
    // The same suite preference as Portcullis (AES-128-GCM first, the server's order), so the
    // ceiling does the same cryptographic work per handshake.
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| !format!("{:?}", s.suite()).contains("AES_128_GCM"));
    let provider = Arc::new(provider);
    let roots = roots(ca);
    let many = roots.len() > 100;
    let mut builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    );
    if many {
        // Names not advertised, as for the other servers' large truststores.
        builder = builder.clear_root_hint_subjects();
    }
    let verifier = builder.build().unwrap();
    let versions: &[&'static rustls::SupportedProtocolVersion] = match version {
        "tls12" => &[&rustls::version::TLS12],
        _ => &[&rustls::version::TLS13],
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert), PrivateKeyDer::from_pem_file(key).unwrap())
        .unwrap();
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.ignore_client_order = true;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(addr).await.unwrap();
    println!("listening {addr}");
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let mut buf = vec![0u8; 16 * 1024];
            let mut have = 0;
            const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
            loop {
                let Ok(n) = tls.read(&mut buf[have..]).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                have += n;
                // Answer each complete head (the load generator sends no bodies).
                let mut out = Vec::new();
                let mut start = 0;
                while let Some(end) = buf[start..have].windows(4).position(|w| w == b"\r\n\r\n") {
                    out.extend_from_slice(ANSWER);
                    start += end + 4;
                }
                buf.copy_within(start..have, 0);
                have -= start;
                if have == buf.len() || (!out.is_empty() && tls.write_all(&out).await.is_err()) {
                    return;
                }
            }
        });
    }
}

async fn idle(args: &[String]) {
    let (addr, host) = (args[0].clone(), args[1].clone());
    let chain = certs(&args[3]);
    let key = PrivateKeyDer::from_pem_file(&args[4]).unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots(&args[2]))
        .with_client_auth_cert(chain, key)
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let n: usize = args[5].parse().unwrap();
    let secs: u64 = args[6].parse().unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (connector, addr, host, gate) =
            (connector.clone(), addr.clone(), host.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await.unwrap();
            let tcp = TcpStream::connect(&addr).await.unwrap();
            let name = ServerName::try_from(host.clone()).unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            tls.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
                .await
                .unwrap();
            // Read until the end of a short answer (head + small body).
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let k = tls.read(&mut buf).await.unwrap();
                assert!(k > 0, "the server closed the connection");
                got.extend_from_slice(&buf[..k]);
                if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                    assert!(head.starts_with("http/1.1 200"), "answer: {head}");
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse::<usize>().unwrap())
                        .unwrap_or(0);
                    if got.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            drop(permit);
            tls
        }));
    }
    let mut held = Vec::with_capacity(n);
    for t in tasks {
        held.push(t.await.unwrap());
    }
    println!("ready {}", held.len());
    tokio::time::sleep(Duration::from_secs(secs)).await;
}

async fn grpc_echo(addr: &str) {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    let listener = TcpListener::bind(addr).await.unwrap();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    let message = req
                        .into_body()
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    let mut trailers = hyper::HeaderMap::new();
                    trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
                    let frames: Vec<Result<Frame<bytes::Bytes>, std::convert::Infallible>> =
                        vec![Ok(Frame::data(message)), Ok(Frame::trailers(trailers))];
                    let body = StreamBody::new(futures_util::stream::iter(frames));
                    Ok::<_, std::convert::Infallible>(
                        hyper::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(body)
                            .unwrap(),
                    )
                },
            );
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("cas") => cas(args[2].parse().unwrap(), &args[3]),
        Some("bare") => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(bare(&args[2], &args[3], &args[4], &args[5], &args[6])),
        Some("grpc-echo") => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(grpc_echo(&args[2])),
        Some("idle") => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(idle(&args[2..])),
        _ => {
            eprintln!(
                "usage: bench_tools cas N OUT | bare ADDR CERT KEY CA tls13|tls12 | grpc-echo ADDR | idle ADDR HOST CA CERT KEY N SECONDS"
            );
            std::process::exit(2);
        }
    }
}
