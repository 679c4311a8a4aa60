//! An MQTT 3.1.1 load generator over mutual TLS, the same program for every broker compared:
//!
//!   mqtt_load HOST:PORT CA CERT KEY connect SECONDS CONCURRENCY
//!   mqtt_load HOST:PORT CA CERT KEY fanin  SECONDS PUBLISHERS QOS [RATE]
//!   mqtt_load HOST:PORT CA CERT KEY fanout SECONDS SUBSCRIBERS QOS
//!   mqtt_load HOST:PORT CA CERT KEY idle   CONNECTIONS SECONDS
//!   mqtt_load HOST:PORT CA CERT KEY latency SECONDS RATE QOS
//!   mqtt_load HOST:PORT CA CERT KEY takeover OTHER_HOST:PORT COUNT
//!   mqtt_load HOST:PORT CA CERT KEY failover OTHER_HOST:PORT PUBLISH_AT_HOST:PORT PID
//!
//! With `MQTT_LOAD_SUBSCRIBE_AT=HOST:PORT`, subscribers connect there instead (another node of
//! a cluster: the messages cross nodes). `latency`: one publisher at RATE messages per second,
//! one subscriber; prints the delivery latency's p50 and p99 in milliseconds. `takeover`: COUNT
//! times, a session on HOST:PORT and then one with the same client id on OTHER: prints the
//! median and worst time from the second CONNECT until the first connection is closed, in ms.
//!
//! `connect`: new TLS connection + CONNECT/CONNACK + DISCONNECT, in a loop per worker; prints
//! connections per second. `fanin`: PUBLISHERS publish as fast as they can to their own topics
//! (or RATE messages per second between them), one subscriber on `bench/#` counts; prints
//! messages received per second (`MQTT_LOAD_TOPICS=N`: each publisher's messages spread over N
//! topics under its own, as a fleet's devices each publish to theirs). `fanout`: one
//! publisher, SUBSCRIBERS on `bench/x`; prints deliveries per second. `idle`: opens CONNECTIONS
//! sessions and holds them, printing `ready` when all are up (`MQTT_LOAD_SUBSCRIBE=1`: each
//! also subscribes to its own topic, and the SUBACKs' waits are printed). QoS 1 publishers keep
//! up to 64 messages unacknowledged.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use portcullis_mqtt::codec::{self, Connect, ConnectProperties, Packet, Protocol, Publish, QoS};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

struct Target {
    addr: String,
    tls: TlsConnector,
}

fn connector(ca: &str, cert: &str, key: &str) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    TlsConnector::from(Arc::new(config))
}

async fn write(tls: &mut TlsStream<TcpStream>, packet: &Packet) {
    let mut out = BytesMut::new();
    codec::write_packet(packet, Protocol::V311, &mut out).unwrap();
    tls.write_all(&out).await.unwrap();
}

async fn read(tls: &mut TlsStream<TcpStream>, buf: &mut BytesMut) -> Option<Packet> {
    loop {
        if let Some(p) = codec::read_packet(buf, Some(Protocol::V311), 1 << 20).unwrap() {
            return Some(p);
        }
        if tls.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

async fn session(t: &Target, client_id: &str) -> (TlsStream<TcpStream>, BytesMut) {
    let (tls, buf, _) = try_session(t, client_id, true)
        .await
        .expect("a CONNACK accepting the session");
    (tls, buf)
}

/// A session (persistent unless `clean`) and whether the broker had one: None if the broker
/// cannot be reached or refuses.
async fn try_session(
    t: &Target,
    client_id: &str,
    clean: bool,
) -> Option<(TlsStream<TcpStream>, BytesMut, bool)> {
    let tcp = TcpStream::connect(&t.addr).await.ok()?;
    tcp.set_nodelay(true).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = t.tls.connect(name, tcp).await.ok()?;
    write(
        &mut tls,
        &Packet::Connect(Connect {
            protocol: Protocol::V311,
            client_id: client_id.into(),
            clean_start: clean,
            keep_alive: 600,
            username: None,
            password: None,
            will: None,
            properties: ConnectProperties::default(),
        }),
    )
    .await;
    let mut buf = BytesMut::new();
    match read(&mut tls, &mut buf).await {
        Some(Packet::ConnAck(a)) if a.code == 0 => Some((tls, buf, a.session_present)),
        _ => None,
    }
}

async fn subscribe(tls: &mut TlsStream<TcpStream>, buf: &mut BytesMut, filter: &str, qos: QoS) {
    write(
        tls,
        &Packet::Subscribe(codec::Subscribe {
            packet_id: 1,
            filters: vec![codec::SubscribeFilter {
                filter: filter.into(),
                qos,
                no_local: false,
                retain_as_published: false,
                retain_handling: 0,
            }],
            properties: Default::default(),
        }),
    )
    .await;
    match read(tls, buf).await {
        Some(Packet::SubAck(a)) if a.codes[0] < 0x80 => {}
        other => panic!("SUBACK expected, got {other:?}"),
    }
}

/// Counts messages received, acknowledging QoS 1 ones: what one read brought is acknowledged
/// in one write (as publishers send 16 publications in one).
async fn count(mut tls: TlsStream<TcpStream>, mut buf: BytesMut, counter: Arc<AtomicU64>) {
    let mut acks = BytesMut::new();
    loop {
        while let Some(p) = codec::read_packet(&mut buf, Some(Protocol::V311), 1 << 20).unwrap() {
            if let Packet::Publish(m) = p {
                counter.fetch_add(1, Ordering::Relaxed);
                if let Some(id) = m.packet_id {
                    codec::write_packet(
                        &Packet::PubAck(codec::PubAck {
                            packet_id: id,
                            reason: 0,
                            properties: Default::default(),
                        }),
                        Protocol::V311,
                        &mut acks,
                    )
                    .unwrap();
                }
            }
        }
        if !acks.is_empty() {
            if tls.write_all(&acks).await.is_err() {
                return;
            }
            acks.clear();
        }
        match tls.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Publishes to `topic` until `until`, QoS 1 with a window of 64.
async fn publisher(
    t: Arc<Target>,
    id: String,
    topic: String,
    qos: QoS,
    (warm, until): (Instant, Instant),
    rate: Option<u64>,
    written: Arc<AtomicU64>,
) {
    let (tls, buf) = session(&t, &id).await;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let window = Arc::new(tokio::sync::Semaphore::new(64));
    let acks = {
        let window = window.clone();
        tokio::spawn(async move {
            let mut buf = buf;
            loop {
                match codec::read_packet(&mut buf, Some(Protocol::V311), 1 << 20) {
                    Ok(Some(Packet::PubAck(_))) => window.add_permits(1),
                    Ok(Some(_)) => {}
                    Ok(None) => match rd.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    },
                    Err(_) => return,
                }
            }
        })
    };
    let payload = Bytes::from_static(b"{\"temperature\": 21.5, \"humidity\": 40}");
    let mut n: u16 = 0;
    let mut out = BytesMut::new();
    // With a rate: every millisecond, what the rate owes since the start (Tokio's timer has
    // millisecond resolution), in writes of up to 16.
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // MQTT_LOAD_TOPICS=N: each message to the next of N topics under the publisher's (as a
    // fleet's devices publish each to its own), not all to one.
    let topics: Vec<String> = match std::env::var("MQTT_LOAD_TOPICS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
    {
        Some(n) if n > 1 => (0..n).map(|i| format!("{topic}/{i}")).collect(),
        _ => vec![topic],
    };
    let mut next = 0;
    while Instant::now() < until {
        out.clear();
        let burst = match rate {
            None => 16,
            Some(rate) => {
                let owed = (start.elapsed().as_nanos() as u64).saturating_mul(rate) / 1_000_000_000;
                if owed <= sent {
                    tick.tick().await;
                    continue;
                }
                (owed - sent).min(16)
            }
        };
        sent += burst;
        for _ in 0..burst {
            let packet_id = if qos == QoS::AtLeastOnce {
                window.acquire().await.unwrap().forget();
                n = n.wrapping_add(1).max(1);
                Some(n)
            } else {
                None
            };
            codec::write_packet(
                &Packet::Publish(Publish {
                    dup: false,
                    qos,
                    retain: false,
                    topic: topics[next % topics.len()].clone(),
                    packet_id,
                    payload: payload.clone(),
                    properties: Default::default(),
                }),
                Protocol::V311,
                &mut out,
            )
            .unwrap();
            next += 1;
        }
        if wr.write_all(&out).await.is_err() {
            break;
        }
        if Instant::now() >= warm {
            written.fetch_add(burst, Ordering::Relaxed);
        }
    }
    let _ = wr.write_all(&[0xE0, 0x00]).await;
    acks.abort();
}

/// `failover OTHER PUBLISH_AT PID`: a persistent QoS 1 subscriber on the target, a publisher on
/// PUBLISH_AT sending 1,000 numbered QoS 1 messages a second; after 1.5 s the target's process
/// (PID) is killed (SIGKILL), the subscriber resumes its session on OTHER at once, and the
/// publisher goes on 2 s more. Prints, in ms from the lost connection: the CONNACK resuming the
/// session, the first message after it, and when it had every message published before the
/// loss and acknowledged; then acknowledged messages in all, duplicates and missing ones.
async fn failover(t: &Arc<Target>, other: &str, publish_at: &str, pid: u32) {
    use std::collections::{HashMap, HashSet};
    use std::sync::Mutex;
    let other = Target {
        addr: other.to_string(),
        tls: t.tls.clone(),
    };
    let publish_at = Target {
        addr: publish_at.to_string(),
        tls: t.tls.clone(),
    };
    let id = format!("failover-{}", std::process::id());
    // A persistent session, subscribed; what it had is dropped first.
    drop(
        try_session(t, &id, true)
            .await
            .expect("the target accepts the session"),
    );
    let (mut tls, mut buf, _) = try_session(t, &id, false)
        .await
        .expect("a persistent session");
    subscribe(&mut tls, &mut buf, "bench/failover", QoS::AtLeastOnce).await;

    let acked: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let (pub_tls, pub_buf) = session(&publish_at, "failover-pub").await;
    let (mut rd, mut wr) = tokio::io::split(pub_tls);
    let ids: Arc<Mutex<HashMap<u16, u64>>> = Arc::default();
    {
        let (acked, ids) = (acked.clone(), ids.clone());
        tokio::spawn(async move {
            let mut buf = pub_buf;
            loop {
                match codec::read_packet(&mut buf, Some(Protocol::V311), 1 << 20) {
                    Ok(Some(Packet::PubAck(a))) => {
                        if let Some(seq) = ids.lock().unwrap().remove(&a.packet_id) {
                            acked.lock().unwrap().insert(seq);
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => match rd.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    },
                    Err(_) => return,
                }
            }
        });
    }
    let published = Arc::new(AtomicU64::new(0));
    let count_published = published.clone();
    let publishing = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        for seq in 0..3_500u64 {
            tick.tick().await;
            let packet_id = (seq % 65_535) as u16 + 1;
            ids.lock().unwrap().insert(packet_id, seq);
            let mut out = BytesMut::new();
            codec::write_packet(
                &Packet::Publish(Publish {
                    dup: false,
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    topic: "bench/failover".into(),
                    packet_id: Some(packet_id),
                    payload: Bytes::copy_from_slice(&seq.to_be_bytes()),
                    properties: Default::default(),
                }),
                Protocol::V311,
                &mut out,
            )
            .unwrap();
            if wr.write_all(&out).await.is_err() {
                return;
            }
            count_published.store(seq + 1, Ordering::Relaxed);
        }
    });
    let killer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    });

    let mut got: HashMap<u64, u32> = HashMap::new();
    let receive = |p: Packet, got: &mut HashMap<u64, u32>, acks: &mut BytesMut| {
        if let Packet::Publish(m) = p {
            if let Ok(seq) = m.payload[..].try_into().map(u64::from_be_bytes) {
                *got.entry(seq).or_default() += 1;
            }
            if let Some(packet_id) = m.packet_id {
                codec::write_packet(
                    &Packet::PubAck(codec::PubAck {
                        packet_id,
                        reason: 0,
                        properties: Default::default(),
                    }),
                    Protocol::V311,
                    acks,
                )
                .unwrap();
            }
        }
    };
    // Until the connection is lost with its node.
    let mut acks = BytesMut::new();
    loop {
        while let Ok(Some(p)) = codec::read_packet(&mut buf, Some(Protocol::V311), 1 << 20) {
            receive(p, &mut got, &mut acks);
        }
        if !acks.is_empty() && tls.write_all(&acks).await.is_err() {
            break;
        }
        acks.clear();
        match tls.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let lost = Instant::now();
    // The messages published before: those its node may have held when it died.
    let before_loss = published.load(Ordering::Relaxed);
    killer.await.unwrap();
    // At once on the other node (as a client's reconnect would), until it takes the session.
    let (mut tls, mut buf, present) = loop {
        if let Some(s) = try_session(&other, &id, false).await {
            break s;
        }
        if lost.elapsed() > Duration::from_secs(30) {
            panic!("no node resumed the session within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let resumed = lost.elapsed();
    let mut first = None;
    let mut caught_up = None;
    let deadline = lost + Duration::from_secs(60);
    loop {
        let before = got.len();
        while let Ok(Some(p)) = codec::read_packet(&mut buf, Some(Protocol::V311), 1 << 20) {
            receive(p, &mut got, &mut acks);
        }
        if got.len() > before {
            first.get_or_insert(lost.elapsed());
        }
        if !acks.is_empty() {
            let _ = tls.write_all(&acks).await;
            acks.clear();
        }
        if caught_up.is_none() {
            let acked = acked.lock().unwrap();
            if acked
                .iter()
                .filter(|s| **s < before_loss)
                .all(|s| got.contains_key(s))
            {
                caught_up = Some(lost.elapsed());
            }
        }
        let done = publishing.is_finished() && {
            let acked = acked.lock().unwrap();
            acked.iter().all(|s| got.contains_key(s))
        };
        if done || Instant::now() > deadline {
            break;
        }
        // (A pause of 100 ms at most: the publisher's acknowledgements are checked again.)
        let read = tokio::time::timeout(Duration::from_millis(100), tls.read_buf(&mut buf)).await;
        if let Ok(Ok(0) | Err(_)) = read {
            break;
        }
    }
    let acked = acked.lock().unwrap();
    let missing = acked.iter().filter(|s| !got.contains_key(s)).count();
    let duplicates: u32 = got.values().map(|n| n - 1).sum();
    println!(
        "{:.0} {:.0} {:.0} {} {} {} {}",
        resumed.as_secs_f64() * 1000.0,
        first.unwrap_or_default().as_secs_f64() * 1000.0,
        caught_up.unwrap_or(deadline - lost).as_secs_f64() * 1000.0,
        acked.len(),
        duplicates,
        missing,
        if present { "resumed" } else { "NOT-RESUMED" }
    );
}

/// This process's CPU time so far (user and system), in seconds.
fn own_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // After the command's closing parenthesis: state is field 3, utime 14 and stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Linux reports them in USER_HZ, 100 a second on every architecture it runs on here.
    (ticks(11) + ticks(12)) / 100.0
}

/// Where subscribers connect: `MQTT_LOAD_SUBSCRIBE_AT`, or the target.
fn subscriber_target(t: &Target) -> Target {
    Target {
        addr: std::env::var("MQTT_LOAD_SUBSCRIBE_AT").unwrap_or_else(|_| t.addr.clone()),
        tls: t.tls.clone(),
    }
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    let t = Arc::new(Target {
        addr: args[1].clone(),
        tls: connector(&args[2], &args[3], &args[4]),
    });
    let mode = args[5].as_str();
    let num = |i: usize| args[i].parse::<u64>().unwrap();
    let qos_of = |i: usize| {
        if num(i) == 1 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        }
    };
    match mode {
        "connect" => {
            let until = Instant::now() + Duration::from_secs(num(6));
            let done = Arc::new(AtomicU64::new(0));
            let mut workers = Vec::new();
            for w in 0..num(7) {
                let (t, done) = (t.clone(), done.clone());
                workers.push(tokio::spawn(async move {
                    let mut i = 0;
                    while Instant::now() < until {
                        let (mut tls, _) = session(&t, &format!("c{w}-{i}")).await;
                        write(
                            &mut tls,
                            &Packet::Disconnect(codec::Disconnect {
                                reason: 0,
                                properties: Default::default(),
                            }),
                        )
                        .await;
                        let _ = tls.shutdown().await;
                        done.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                }));
            }
            for w in workers {
                w.await.unwrap();
            }
            println!("{:.0}", done.load(Ordering::Relaxed) as f64 / num(6) as f64);
        }
        "fanin" | "fanout" => {
            let secs = num(6);
            let n = num(7);
            let qos = qos_of(8);
            let counter = Arc::new(AtomicU64::new(0));
            let subscribers = if mode == "fanin" { 1 } else { n };
            let at = subscriber_target(&t);
            if mode == "fanin" {
                // The one subscriber on a thread of its own, as a client of its own would be: in
                // the publishers' runtime it got a ninth of it, and a broker faster to accept
                // than to deliver starved it (its messages dropped for a slow subscriber).
                let (ready, up) = std::sync::mpsc::channel();
                let counter = counter.clone();
                std::thread::spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap()
                        .block_on(async move {
                            let (mut tls, mut buf) = session(&at, "sub0").await;
                            subscribe(&mut tls, &mut buf, "bench/#", qos).await;
                            ready.send(()).unwrap();
                            count(tls, buf, counter).await;
                        });
                });
                up.recv().unwrap();
            } else {
                for s in 0..subscribers {
                    let (mut tls, mut buf) = session(&at, &format!("sub{s}")).await;
                    subscribe(&mut tls, &mut buf, "bench/x", qos).await;
                    tokio::spawn(count(tls, buf, counter.clone()));
                }
            }
            let warm = Instant::now() + Duration::from_secs(1);
            let until = warm + Duration::from_secs(secs);
            let publishers = if mode == "fanin" { n } else { 1 };
            // RATE: messages per second between all publishers.
            let rate = args.get(9).map(|_| num(9).div_ceil(publishers).max(1));
            let sent = Arc::new(AtomicU64::new(0));
            let mut tasks = Vec::new();
            for p in 0..publishers {
                let topic = if mode == "fanin" {
                    format!("bench/p{p}")
                } else {
                    "bench/x".to_string()
                };
                tasks.push(tokio::spawn(publisher(
                    t.clone(),
                    format!("pub{p}"),
                    topic,
                    qos,
                    (warm, until),
                    rate,
                    sent.clone(),
                )));
            }
            tokio::time::sleep_until(warm.into()).await;
            let start = counter.load(Ordering::Relaxed);
            let cpu_start = own_cpu();
            tokio::time::sleep_until(until.into()).await;
            let end = counter.load(Ordering::Relaxed);
            println!("{:.0}", (end - start) as f64 / secs as f64);
            // What the publishers wrote in the same window, and the generator's own CPU: a
            // broker that accepts more than reaches the subscriber drops the rest (QoS 0).
            eprintln!(
                "sent {:.0} msgs/s; load generator {:.1} CPU s",
                sent.load(Ordering::Relaxed) as f64 / secs as f64,
                own_cpu() - cpu_start
            );
            for task in tasks {
                task.abort();
            }
        }
        "idle" => {
            let n = num(6);
            let mut held = Vec::new();
            let limit = Arc::new(tokio::sync::Semaphore::new(64));
            let up = Arc::new(AtomicU64::new(0));
            let progress = {
                let up = up.clone();
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        eprintln!("{} of {n} sessions up", up.load(Ordering::Relaxed));
                    }
                })
            };
            // MQTT_LOAD_SUBSCRIBE=1: each session then subscribes to its own command topic, as
            // a fleet's devices do (a subscribe storm); the SUBACKs' waits are printed.
            let subscribing = std::env::var_os("MQTT_LOAD_SUBSCRIBE").is_some_and(|v| v != "0");
            let started = Instant::now();
            let mut tasks = Vec::new();
            for i in 0..n {
                let (t, limit, up) = (t.clone(), limit.clone(), up.clone());
                tasks.push(tokio::spawn(async move {
                    let _permit = limit.acquire().await.unwrap();
                    let prefix = std::env::var("MQTT_LOAD_ID_PREFIX").unwrap_or_default();
                    let id = format!("{prefix}idle{i}");
                    let (mut tls, mut buf) = session(&t, &id).await;
                    let mut waited = None;
                    if subscribing {
                        let asked = Instant::now();
                        let filter = format!("bench/dev/{id}/cmd");
                        subscribe(&mut tls, &mut buf, &filter, QoS::AtLeastOnce).await;
                        waited = Some(asked.elapsed());
                    }
                    up.fetch_add(1, Ordering::Relaxed);
                    ((tls, buf), waited)
                }));
            }
            let mut waits = Vec::new();
            for task in tasks {
                let (s, waited) = task.await.unwrap();
                held.push(s);
                waits.extend(waited);
            }
            progress.abort();
            let all = started.elapsed().as_secs_f64();
            if waits.is_empty() {
                eprintln!("{n} sessions up in {all:.1} s");
            } else {
                waits.sort_unstable();
                let ms = |q: f64| {
                    waits[((waits.len() as f64 * q) as usize).min(waits.len() - 1)].as_secs_f64()
                        * 1000.0
                };
                eprintln!(
                    "{n} sessions up and subscribed in {all:.1} s; SUBACK after p50 {:.1} ms, p99 {:.1} ms, worst {:.1} ms",
                    ms(0.5),
                    ms(0.99),
                    ms(1.0)
                );
            }
            println!("ready");
            tokio::time::sleep(Duration::from_secs(num(7))).await;
            drop(held);
        }
        "latency" => {
            let secs = num(6);
            let rate = num(7).max(1);
            let qos = qos_of(8);
            let (mut tls, mut buf) = session(&subscriber_target(&t), "lat-sub").await;
            subscribe(&mut tls, &mut buf, "bench/lat", qos).await;
            let origin = Instant::now();
            let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
            let recorder = {
                let samples = samples.clone();
                tokio::spawn(async move {
                    while let Some(p) = read(&mut tls, &mut buf).await {
                        if let Packet::Publish(m) = p {
                            let sent = u64::from_be_bytes(m.payload[..8].try_into().unwrap());
                            let now = origin.elapsed().as_nanos() as u64;
                            samples.lock().unwrap().push(now.saturating_sub(sent));
                            if let Some(id) = m.packet_id {
                                write(
                                    &mut tls,
                                    &Packet::PubAck(codec::PubAck {
                                        packet_id: id,
                                        reason: 0,
                                        properties: Default::default(),
                                    }),
                                )
                                .await;
                            }
                        }
                    }
                })
            };
            let (pub_tls, pub_buf) = session(&t, "lat-pub").await;
            let (mut rd, mut wr) = tokio::io::split(pub_tls);
            tokio::spawn(async move {
                let mut buf = pub_buf;
                while let Ok(n) = rd.read_buf(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    buf.clear();
                }
            });
            let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
            let until = Instant::now() + Duration::from_secs(secs + 1);
            let warm = Instant::now() + Duration::from_secs(1);
            let mut id: u16 = 0;
            while Instant::now() < until {
                tick.tick().await;
                id = id.wrapping_add(1).max(1);
                let stamp = origin.elapsed().as_nanos() as u64;
                let mut out = BytesMut::new();
                codec::write_packet(
                    &Packet::Publish(Publish {
                        dup: false,
                        qos,
                        retain: false,
                        topic: "bench/lat".into(),
                        packet_id: (qos == QoS::AtLeastOnce).then_some(id),
                        payload: Bytes::copy_from_slice(&stamp.to_be_bytes()),
                        properties: Default::default(),
                    }),
                    Protocol::V311,
                    &mut out,
                )
                .unwrap();
                wr.write_all(&out).await.unwrap();
                if Instant::now() < warm {
                    samples.lock().unwrap().clear();
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            recorder.abort();
            let mut s = samples.lock().unwrap().clone();
            s.sort_unstable();
            let at = |q: f64| s[((s.len() as f64 * q) as usize).min(s.len() - 1)] as f64 / 1e6;
            println!("{:.3} {:.3} {}", at(0.5), at(0.99), s.len());
        }
        "takeover" => {
            let other = Target {
                addr: args[6].clone(),
                tls: t.tls.clone(),
            };
            let mut times = Vec::new();
            for i in 0..num(7) {
                let id = format!("takeover-{i}");
                let (mut first, mut buf) = session(&t, &id).await;
                let started = Instant::now();
                let second = session(&other, &id).await;
                // The first connection ends (3.1.1: closed) when the cluster says it moved.
                while read(&mut first, &mut buf).await.is_some() {}
                times.push(started.elapsed().as_secs_f64() * 1000.0);
                drop(second);
            }
            times.sort_by(f64::total_cmp);
            println!(
                "{:.1} {:.1}",
                times[times.len() / 2],
                times[times.len() - 1]
            );
        }
        "failover" => failover(&t, &args[6], &args[7], num(8) as u32).await,
        other => panic!("unknown mode {other}"),
    }
}
