//! One store test suite, run against SQLite always and against a real PostgreSQL server when
//! `PORTCULLIS_TEST_POSTGRES` names one (the test command starts one; in CI it is required).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use portcullis_pki::issue::{self, CaIssuer};
use portcullis_pki::{IssueRequest, KeyType, PrivateKey, Profile, SubjectName};
use portcullis_registry::{CaStatus, CertFilter, CertId, CertStatus, RegistryError, Store};

fn ca(name: &str) -> CaIssuer {
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let cert = issue::issue(
        &IssueRequest::new(Profile::RootCa, SubjectName::cn(name)),
        &key,
        None,
    )
    .unwrap();
    CaIssuer::new(cert, key, Vec::new()).unwrap()
}

fn leaf(ca: &CaIssuer, cn: &str, profile: Profile) -> String {
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    issue::issue(
        &IssueRequest::new(profile, SubjectName::cn(cn)),
        &key,
        Some(ca),
    )
    .unwrap()
    .to_pem()
}

async fn suite(store: Store) {
    let backend = store.backend();
    // The registration code is made once.
    let code = store.registration_code().await.unwrap();
    assert_eq!(code.len(), 64, "{backend}");
    assert_eq!(code, store.registration_code().await.unwrap(), "{backend}");

    // CA registration with proof of possession.
    let fleet = ca("Fleet CA");
    let proof = leaf(&fleet, &code, Profile::Verification);
    let record = store
        .register_ca(
            fleet.certificate().to_pem().as_bytes(),
            Some(proof.as_bytes()),
            false,
            true,
            true,
            "test",
        )
        .await
        .unwrap();
    assert!(record.verified && record.auto_registration, "{backend}");
    assert_eq!(record.status, CaStatus::Active);
    let again = store
        .register_ca(
            fleet.certificate().to_pem().as_bytes(),
            Some(proof.as_bytes()),
            false,
            true,
            true,
            "test",
        )
        .await;
    assert!(
        matches!(again, Err(RegistryError::Conflict(_))),
        "{backend}: {again:?}"
    );
    // Wrong code, wrong key, no proof, not a CA.
    let other = ca("Other CA");
    let wrong_code = leaf(&other, &"0".repeat(64), Profile::Verification);
    let r = store
        .register_ca(
            other.certificate().to_pem().as_bytes(),
            Some(wrong_code.as_bytes()),
            false,
            true,
            false,
            "test",
        )
        .await;
    assert!(
        matches!(r, Err(RegistryError::Invalid(ref m)) if m.contains("CN=<registration code>")),
        "{r:?}"
    );
    let wrong_key = leaf(&fleet, &code, Profile::Verification);
    let r = store
        .register_ca(
            other.certificate().to_pem().as_bytes(),
            Some(wrong_key.as_bytes()),
            false,
            true,
            false,
            "test",
        )
        .await;
    assert!(
        matches!(r, Err(RegistryError::Invalid(ref m)) if m.contains("not signed")),
        "{r:?}"
    );
    let r = store
        .register_ca(
            other.certificate().to_pem().as_bytes(),
            None,
            false,
            true,
            false,
            "test",
        )
        .await;
    assert!(matches!(r, Err(RegistryError::Invalid(_))), "{r:?}");
    let device = leaf(&fleet, "device-0", Profile::Client);
    let r = store
        .register_ca(device.as_bytes(), None, true, true, false, "test")
        .await;
    assert!(
        matches!(r, Err(RegistryError::Invalid(ref m)) if m.contains("not a CA")),
        "{r:?}"
    );
    let unverified = store
        .register_ca(
            other.certificate().to_pem().as_bytes(),
            None,
            true,
            false,
            false,
            "test",
        )
        .await
        .unwrap();
    assert!(!unverified.verified);
    assert_eq!(unverified.status, CaStatus::Inactive);
    assert_eq!(store.list_cas().await.unwrap().len(), 2);

    // Certificates: the issuing CA is linked.
    let mut ids = Vec::new();
    for i in 0..5 {
        let pem = leaf(&fleet, &format!("device-{i}"), Profile::Client);
        let c = store
            .register_certificate(pem.as_bytes(), CertStatus::Active, "test")
            .await
            .unwrap();
        assert_eq!(c.ca_id.as_ref(), Some(&record.id), "{backend}");
        ids.push(c.id);
    }
    let stray = leaf(&ca("Unregistered CA"), "stray", Profile::Client);
    let stray = store
        .register_certificate(stray.as_bytes(), CertStatus::Inactive, "test")
        .await
        .unwrap();
    assert!(stray.ca_id.is_none());
    let dup = store.certificate(&ids[0]).await.unwrap();
    let r = store
        .register_certificate(dup.pem.as_bytes(), CertStatus::Active, "test")
        .await;
    assert!(matches!(r, Err(RegistryError::Conflict(_))), "{r:?}");
    let r = store
        .register_certificate(b"not pem", CertStatus::Active, "test")
        .await;
    assert!(matches!(r, Err(RegistryError::Pki(_))), "{r:?}");

    // Listing: filters and pagination by id.
    let all = store
        .list_certificates(&CertFilter::default())
        .await
        .unwrap();
    assert_eq!(all.len(), 6);
    let fleet_only = CertFilter {
        ca: Some(record.id.clone()),
        ..Default::default()
    };
    assert_eq!(store.list_certificates(&fleet_only).await.unwrap().len(), 5);
    let inactive = CertFilter {
        status: Some(CertStatus::Inactive),
        ..Default::default()
    };
    assert_eq!(store.list_certificates(&inactive).await.unwrap().len(), 1);
    let soon = CertFilter {
        expiring_before: Some(dup.not_after + 1),
        ..Default::default()
    };
    assert_eq!(store.list_certificates(&soon).await.unwrap().len(), 6);
    let none = CertFilter {
        expiring_before: Some(dup.created_at),
        ..Default::default()
    };
    assert!(store.list_certificates(&none).await.unwrap().is_empty());
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_certificates(&CertFilter {
                limit: Some(4),
                after: after.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().map(|c| c.id.clone());
        pages.push(page.len());
    }
    assert_eq!(pages, vec![4, 2], "{backend}");

    // Status changes: versioned; REVOKED is permanent; ACTIVE cannot be deleted.
    let c = store
        .set_certificate_status(&ids[0], CertStatus::Inactive, "test")
        .await
        .unwrap();
    assert_eq!(c.version, 2);
    store
        .set_certificate_status(&ids[0], CertStatus::Revoked, "test")
        .await
        .unwrap();
    let r = store
        .set_certificate_status(&ids[0], CertStatus::Active, "test")
        .await;
    assert!(
        matches!(r, Err(RegistryError::Invalid(ref m)) if m.contains("permanent")),
        "{r:?}"
    );
    let r = store.delete_certificate(&ids[1], "test").await;
    assert!(
        matches!(r, Err(RegistryError::Invalid(ref m)) if m.contains("ACTIVE")),
        "{r:?}"
    );
    store.delete_certificate(&ids[0], "test").await.unwrap();
    assert!(matches!(
        store.certificate(&ids[0]).await,
        Err(RegistryError::NotFound(_))
    ));

    // Concurrent updates of one certificate never lose one.
    let store = Arc::new(store);
    let target = ids[2].clone();
    let before = store.certificate(&target).await.unwrap().version;
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (store, target) = (store.clone(), target.clone());
            tokio::spawn(async move {
                let status = if i % 2 == 0 {
                    CertStatus::Inactive
                } else {
                    CertStatus::Active
                };
                store
                    .set_certificate_status(&target, status, "racer")
                    .await
                    .unwrap();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        store.certificate(&target).await.unwrap().version,
        before + 16,
        "{backend}"
    );

    // Seen, CA updates, audit.
    store
        .mark_seen(&[ids[3].clone()], 1_700_000_000)
        .await
        .unwrap();
    assert_eq!(
        store.certificate(&ids[3]).await.unwrap().last_seen,
        Some(1_700_000_000)
    );
    let updated = store
        .update_ca(&record.id, Some(CaStatus::Inactive), Some(false), "test")
        .await
        .unwrap();
    assert_eq!(
        (updated.status, updated.auto_registration, updated.version),
        (CaStatus::Inactive, false, 2)
    );
    let log = store.audit_log(1000).await.unwrap();
    let racers = log.iter().filter(|e| e.actor == "racer").count();
    assert_eq!(racers, 16, "{backend}");
    assert!(log.iter().any(|e| e.action == "ca.register"));
    assert!(
        log.iter()
            .any(|e| e.action == "certificate.delete" && e.target == ids[0].as_str())
    );
    let revoke = log
        .iter()
        .find(|e| {
            e.action == "certificate.status"
                && e.after.as_deref().is_some_and(|a| a.contains("REVOKED"))
        })
        .unwrap();
    assert!(revoke.before.as_deref().unwrap().contains("INACTIVE"));
    assert!("nope".parse::<CertId>().is_err());
}

#[tokio::test]
async fn store_suite_on_sqlite() {
    let dir = portcullis_testkit::temp_dir();
    let path = dir.path().join("registry.db");
    let store = Store::open(path.to_str().unwrap()).await.unwrap();
    suite(store).await;
    // Reopening applies no migration twice and keeps the data.
    let store = Store::open(path.to_str().unwrap()).await.unwrap();
    assert_eq!(store.list_cas().await.unwrap().len(), 2);
}

#[tokio::test]
async fn store_suite_on_postgres() {
    let Ok(base) = std::env::var("PORTCULLIS_TEST_POSTGRES") else {
        if std::env::var_os("CI").is_some() {
            panic!(
                "PORTCULLIS_TEST_POSTGRES is not set; the test command (scripts/test) starts PostgreSQL and sets it"
            );
        }
        eprintln!(
            "SKIP: PORTCULLIS_TEST_POSTGRES is not set (run scripts/test to start PostgreSQL)"
        );
        return;
    };
    // A fresh database per run.
    let name = format!("portcullis_test_{}", std::process::id());
    let admin = sqlx::PgPool::connect(&base)
        .await
        .expect("connecting to PORTCULLIS_TEST_POSTGRES");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name}"
    )))
    .execute(&admin)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .unwrap();
    let url = match base.rsplit_once('/') {
        Some((server, _)) => format!("{server}/{name}"),
        None => panic!("PORTCULLIS_TEST_POSTGRES must end with /<database>"),
    };
    let store = Store::open(&url).await.unwrap();
    suite(store).await;
    let store = Store::open(&url).await.unwrap();
    assert_eq!(store.list_cas().await.unwrap().len(), 2);
    drop(store);
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await;
}
