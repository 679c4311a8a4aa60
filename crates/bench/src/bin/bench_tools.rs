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
//!       carried and `grpc-status: 0` in trailers; calls to a method named `Stream` are echoed
//!       message by message as they arrive. Any other HTTP/2 request gets the same (an empty
//!       body and the trailers).
//!   bench_tools grpc-stream ADDR HOST CA CERT KEY CONNECTIONS STREAMS SECONDS
//!       Streaming load (one thread): CONNECTIONS mutual-TLS HTTP/2 connections, STREAMS
//!       bidirectional calls on each, each keeping 8 messages in flight and sending one more per
//!       message echoed; prints the messages echoed per second over SECONDS.
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
    // The same suite and key-exchange preferences as Portcullis (AES-128-GCM first, the
    // server's order; the post-quantum hybrid X25519MLKEM768 first, chosen whenever the client
    // sends its key share, as oha does), so the ceiling does the same cryptographic work per
    // handshake.
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| !format!("{:?}", s.suite()).contains("AES_128_GCM"));
    provider
        .kx_groups
        .sort_by_key(|g| g.name() != rustls::NamedGroup::X25519MLKEM768);
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

/// The echo's answer: each data frame of the request as it arrives, then `grpc-status: 0`.
struct Echo {
    inner: hyper::body::Incoming,
    done: bool,
}

impl hyper::body::Body for Echo {
    type Data = bytes::Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, hyper::Error>>> {
        use std::task::Poll;
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        return Poll::Ready(Some(Ok(hyper::body::Frame::data(data))));
                    }
                }
                Poll::Ready(None) => {
                    self.done = true;
                    let mut trailers = hyper::HeaderMap::new();
                    trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
                    return Poll::Ready(Some(Ok(hyper::body::Frame::trailers(trailers))));
                }
            }
        }
    }
}

async fn grpc_echo(addr: &str) {
    use http_body_util::BodyExt;
    let listener = TcpListener::bind(addr).await.unwrap();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    let streaming = req.uri().path().ends_with("/Stream");
                    let body = if streaming {
                        Echo {
                            inner: req.into_body(),
                            done: false,
                        }
                        .boxed()
                    } else {
                        // Unary: answered once the call is read, headers, message and trailers
                        // together, as a unary handler answers.
                        let message = req
                            .into_body()
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let mut trailers = hyper::HeaderMap::new();
                        trailers
                            .insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
                        http_body_util::Full::new(message)
                            .with_trailers(async move { Some(Ok(trailers)) })
                            .map_err(|never| match never {})
                            .boxed()
                    };
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

/// One framed gRPC message: 5-byte prefix, 10 bytes of payload (the unary rows' message).
const GRPC_MESSAGE: &[u8] = b"\x00\x00\x00\x00\x0ahelloworld";

/// Messages each streaming call keeps in flight.
const STREAM_WINDOW: usize = 8;

async fn grpc_stream(args: &[String]) {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use std::sync::atomic::{AtomicU64, Ordering};
    let (addr, host) = (args[0].clone(), args[1].clone());
    let chain = certs(&args[3]);
    let key = PrivateKeyDer::from_pem_file(&args[4]).unwrap();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots(&args[2]))
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let conns: usize = args[5].parse().unwrap();
    let streams: usize = args[6].parse().unwrap();
    let secs: u64 = args[7].parse().unwrap();
    let echoed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    for _ in 0..conns {
        let tcp = TcpStream::connect(&addr).await.unwrap();
        let _ = tcp.set_nodelay(true);
        let tls = connector
            .connect(ServerName::try_from(host.clone()).unwrap(), tcp)
            .await
            .unwrap();
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        for _ in 0..streams {
            let (mut sender, echoed, failed, host) =
                (sender.clone(), echoed.clone(), failed.clone(), host.clone());
            tokio::spawn(async move {
                let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(STREAM_WINDOW * 2);
                let body = StreamBody::new(Box::pin(futures_util::stream::unfold(
                    rx,
                    |mut rx| async move {
                        rx.recv()
                            .await
                            .map(|b| (Ok::<_, std::convert::Infallible>(Frame::data(b)), rx))
                    },
                )));
                let req = hyper::Request::post(format!("https://{host}/bench.Echo/Stream"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(body)
                    .unwrap();
                for _ in 0..STREAM_WINDOW {
                    tx.send(bytes::Bytes::from_static(GRPC_MESSAGE))
                        .await
                        .unwrap();
                }
                let Ok(response) = sender.send_request(req).await else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let mut body = response.into_body();
                let mut pending = 0;
                while let Some(frame) = body.frame().await {
                    let Ok(frame) = frame else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    let Ok(data) = frame.into_data() else {
                        // Trailers before the run ended: the call was ended for us.
                        failed.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    pending += data.len();
                    while pending >= GRPC_MESSAGE.len() {
                        pending -= GRPC_MESSAGE.len();
                        echoed.fetch_add(1, Ordering::Relaxed);
                        if tx
                            .send(bytes::Bytes::from_static(GRPC_MESSAGE))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    }
    // Counted over the run's own span, after every call started.
    let from = echoed.load(Ordering::Relaxed);
    let at = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let n = echoed.load(Ordering::Relaxed) - from;
    let elapsed = at.elapsed().as_secs_f64();
    println!(
        "messages {n} seconds {elapsed:.3} rate {:.0} failed {}",
        n as f64 / elapsed,
        failed.load(Ordering::Relaxed)
    );
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
        Some("grpc-stream") => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(grpc_stream(&args[2..])),
        Some("idle") => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(idle(&args[2..])),
        _ => {
            eprintln!(
                "usage: bench_tools cas N OUT | bare ADDR CERT KEY CA tls13|tls12 | grpc-echo ADDR | grpc-stream ADDR HOST CA CERT KEY CONNECTIONS STREAMS SECONDS | idle ADDR HOST CA CERT KEY N SECONDS"
            );
            std::process::exit(2);
        }
    }
}
