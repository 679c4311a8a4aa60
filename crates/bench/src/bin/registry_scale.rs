//! The registry at scale: fills a registry with N certificates (default 1,000,000) and measures
//! what a gateway node pays for them — the in-process batch insert rate, the snapshot's start-up
//! load time and memory, the cost of an incremental update, and a status lookup.
//!
//!   cargo run --release -p portcullis --example registry_scale -- [N] [DATABASE] [OUT_DIR]
//!   cargo run --release -p portcullis --example registry_scale -- files N DIR
//!
//! DATABASE defaults to a SQLite file in OUT_DIR (default `./scale`); OUT_DIR also receives
//! `client.pem`/`client.key` (a registered ACTIVE client certificate) and `ca.pem`. The `files`
//! form writes N certificate files into DIR instead (for `portcullis cert register --bulk`).
//! `bench/registry-scale.sh` runs both and measures `portcullis serve` on the filled registry.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Instant;

use portcullis_gateway::registry_view::{RegisteredStatus, RegistrySnapshot};
use portcullis_pki::issue::{self, CaIssuer};
use portcullis_pki::{IssueRequest, KeyType, PrivateKey, Profile, SubjectName};
use portcullis_registry::{CertStatus, Store};

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or_default()
}

/// Writes `n` certificate files (one CA, one shared key) into `dir`.
fn write_files(n: usize, dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let ca_cert = issue::issue(
        &IssueRequest::new(Profile::RootCa, SubjectName::cn("Bulk CA")),
        &key,
        None,
    )
    .unwrap();
    let ca = CaIssuer::new(ca_cert, key, Vec::new()).unwrap();
    let leaf_key = PrivateKey::generate(KeyType::EcP256).unwrap();
    std::thread::scope(|scope| {
        for t in 0..2 {
            let (ca, key) = (&ca, &leaf_key);
            scope.spawn(move || {
                for i in (0..n).filter(|i| i % 2 == t) {
                    let req =
                        IssueRequest::new(Profile::Client, SubjectName::cn(format!("bulk-{i}")));
                    let pem = issue::issue(&req, key, Some(ca)).unwrap().to_pem();
                    std::fs::write(dir.join(format!("bulk-{i:07}.pem")), pem).unwrap();
                }
            });
        }
    });
}

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("files") {
        let n = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(20_000);
        let dir = std::path::PathBuf::from(args.get(3).cloned().unwrap_or_else(|| "bulk".into()));
        write_files(n, &dir);
        return;
    }
    let n: usize = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let out = std::path::PathBuf::from(args.get(3).cloned().unwrap_or_else(|| "scale".into()));
    std::fs::create_dir_all(&out).unwrap();
    let database = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| out.join("registry.db").display().to_string());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = runtime.block_on(Store::open(&database)).unwrap();

    // A CA, one key shared by every leaf (what matters here is N distinct certificates), and
    // the client certificate the load generator presents.
    let ca_key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let ca_cert = issue::issue(
        &IssueRequest::new(Profile::RootCa, SubjectName::cn("Scale CA")),
        &ca_key,
        None,
    )
    .unwrap();
    let ca = CaIssuer::new(ca_cert, ca_key, Vec::new()).unwrap();
    std::fs::write(out.join("ca.pem"), ca.certificate().to_pem()).unwrap();
    let client_key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let client = issue::issue(
        &IssueRequest::new(Profile::Client, SubjectName::cn("scale-client")),
        &client_key,
        Some(&ca),
    )
    .unwrap();
    std::fs::write(out.join("client.pem"), client.to_pem()).unwrap();
    std::fs::write(out.join("client.key"), client_key.to_pem()).unwrap();
    runtime
        .block_on(store.register_certificate(
            client.to_pem().as_bytes(),
            CertStatus::Active,
            "bench",
        ))
        .unwrap();

    // Issue and register the rest in batches of 1,000 (one transaction each).
    let leaf_key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let started = Instant::now();
    let (mut issuing, mut inserting) = (0.0, 0.0);
    let mut done = 1;
    while done < n {
        let count = (n - done).min(1000);
        let t = Instant::now();
        let threads = 2;
        let pems: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let (ca, key) = (&ca, &leaf_key);
                    scope.spawn(move || {
                        (0..count)
                            .filter(|i| i % threads == t)
                            .map(|i| {
                                let req = IssueRequest::new(
                                    Profile::Client,
                                    SubjectName::cn(format!("device-{}", done + i)),
                                );
                                issue::issue(&req, key, Some(ca)).unwrap().to_pem()
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        issuing += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let refs: Vec<&[u8]> = pems.iter().map(|p| p.as_bytes()).collect();
        let results = runtime
            .block_on(store.register_certificates(&refs, CertStatus::Active, "bench"))
            .unwrap();
        assert!(results.iter().all(Result::is_ok));
        inserting += t.elapsed().as_secs_f64();
        done += count;
        if done % 100_000 < 1000 {
            eprintln!(
                "  {done} certificates ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
        }
    }
    println!("certificates in the registry            {n}");
    println!(
        "issuing (2 threads)                      {:.0}/s",
        (n - 1) as f64 / issuing.max(1e-9)
    );
    println!(
        "batch insert, in process ({})   {:.0}/s",
        store.backend(),
        (n - 1) as f64 / inserting.max(1e-9)
    );

    // A node's start-up load: read every status and build the snapshot.
    let before = rss_bytes();
    let t = Instant::now();
    let mut builder = portcullis_gateway::registry_view::SnapshotBuilder::default();
    runtime
        .block_on(store.for_each_status(|id, s, grace| {
            let status = match s {
                CertStatus::Active if grace > 0 => RegisteredStatus::ActiveWithGrace(grace),
                CertStatus::Active => RegisteredStatus::Active,
                CertStatus::Inactive => RegisteredStatus::Inactive,
                CertStatus::PendingActivation => RegisteredStatus::PendingActivation,
                CertStatus::Revoked => RegisteredStatus::Revoked,
            };
            builder.add(id, status);
        }))
        .unwrap();
    let snapshot: RegistrySnapshot = builder.build();
    let loaded = t.elapsed();
    let after = rss_bytes();
    println!(
        "snapshot load at start (streamed)        {:.2} s",
        loaded.as_secs_f64()
    );
    println!(
        "snapshot status map                      {:.1} MiB ({} bytes per certificate); process RSS grew {:.1} MiB",
        snapshot.status_bytes() as f64 / 1048576.0,
        snapshot.status_bytes() / n.max(1),
        after.saturating_sub(before) as f64 / 1048576.0
    );

    // A status lookup, as a handshake does it.
    let id = client.info().id.clone();
    let t = Instant::now();
    let rounds = 1_000_000;
    for _ in 0..rounds {
        std::hint::black_box(snapshot.status(std::hint::black_box(&id)));
    }
    println!(
        "status lookup                            {:.0} ns",
        t.elapsed().as_secs_f64() * 1e9 / f64::from(rounds)
    );

    // An incremental update: one certificate changes; the node reads that change and derives
    // the next snapshot, sharing every untouched shard.
    let marker = runtime.block_on(store.change_marker()).unwrap();
    let cert_id = portcullis_registry::CertId::of_der(client.der());
    runtime
        .block_on(store.set_certificate_status(&cert_id, CertStatus::Inactive, "bench"))
        .unwrap();
    let t = Instant::now();
    let changes = runtime
        .block_on(store.changes_since(marker, i64::MAX, 20_001))
        .unwrap();
    let read_changes = t.elapsed();
    let ids: Vec<String> = changes.iter().map(|c| c.target.clone()).collect();
    let fresh = runtime.block_on(store.statuses_of(&ids)).unwrap();
    let read_statuses = t.elapsed();
    let next = snapshot.with_changes(
        fresh
            .into_iter()
            .map(|(id, _, _)| (id.to_string(), Some(RegisteredStatus::Inactive))),
    );
    println!(
        "incremental update (one change)          {:.2} ms (changes read {:.2} ms, statuses read {:.2} ms)",
        t.elapsed().as_secs_f64() * 1000.0,
        read_changes.as_secs_f64() * 1000.0,
        (read_statuses - read_changes).as_secs_f64() * 1000.0
    );
    assert_eq!(next.status(&id), Some(RegisteredStatus::Inactive));
    runtime
        .block_on(store.set_certificate_status(&cert_id, CertStatus::Active, "bench"))
        .unwrap();
    println!("database                                 {database}");
}
