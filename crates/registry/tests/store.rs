//! One store test suite, run against SQLite always and against a real PostgreSQL server when
//! `PORTCULLIS_TEST_POSTGRES` names one (the test command starts one; in CI it is required).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use portcullis_pki::issue::{self, CaIssuer};
use portcullis_pki::{IssueRequest, KeyType, PrivateKey, Profile, SubjectName};
use portcullis_registry::{
    AuditFilter, CaRegistration, CaStatus, CaUpdate, CertFilter, CertId, CertStatus, NewWebhook,
    PolicyTarget, ProvisioningTemplate, RegistryError, Sighting, Store, TargetType,
};

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
            CaRegistration {
                certificate: fleet.certificate().to_pem().as_bytes(),
                verification: Some(proof.as_bytes()),
                allow_unverified: false,
                activate: true,
                auto_registration: true,
                provisioning_template: None,
            },
            "test",
        )
        .await
        .unwrap();
    assert!(record.verified && record.auto_registration, "{backend}");
    assert_eq!(record.status, CaStatus::Active);
    let again = store
        .register_ca(
            CaRegistration {
                certificate: fleet.certificate().to_pem().as_bytes(),
                verification: Some(proof.as_bytes()),
                allow_unverified: false,
                activate: true,
                auto_registration: true,
                provisioning_template: None,
            },
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
            CaRegistration {
                certificate: other.certificate().to_pem().as_bytes(),
                verification: Some(wrong_code.as_bytes()),
                allow_unverified: false,
                activate: true,
                auto_registration: false,
                provisioning_template: None,
            },
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
            CaRegistration {
                certificate: other.certificate().to_pem().as_bytes(),
                verification: Some(wrong_key.as_bytes()),
                allow_unverified: false,
                activate: true,
                auto_registration: false,
                provisioning_template: None,
            },
            "test",
        )
        .await;
    assert!(
        matches!(r, Err(RegistryError::Invalid(ref m)) if m.contains("not signed")),
        "{r:?}"
    );
    let r = store
        .register_ca(
            CaRegistration {
                certificate: other.certificate().to_pem().as_bytes(),
                verification: None,
                allow_unverified: false,
                activate: true,
                auto_registration: false,
                provisioning_template: None,
            },
            "test",
        )
        .await;
    assert!(matches!(r, Err(RegistryError::Invalid(_))), "{r:?}");
    let device = leaf(&fleet, "device-0", Profile::Client);
    let r = store
        .register_ca(
            CaRegistration {
                certificate: device.as_bytes(),
                verification: None,
                allow_unverified: true,
                activate: true,
                auto_registration: false,
                provisioning_template: None,
            },
            "test",
        )
        .await;
    assert!(
        matches!(r, Err(RegistryError::Invalid(ref m)) if m.contains("not a CA")),
        "{r:?}"
    );
    let unverified = store
        .register_ca(
            CaRegistration {
                certificate: other.certificate().to_pem().as_bytes(),
                verification: None,
                allow_unverified: true,
                activate: false,
                auto_registration: false,
                provisioning_template: None,
            },
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
    // (Certificates issued across a second boundary expire a second apart.)
    let latest = all.iter().map(|c| c.not_after).max().unwrap();
    let soon = CertFilter {
        expiring_before: Some(latest + 1),
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

    // Sightings: registered or not; the newest time wins.
    let seen_cert = portcullis_pki::Certificate::first_and_rest(
        store.certificate(&ids[3]).await.unwrap().pem.as_bytes(),
    )
    .unwrap()
    .0;
    let unregistered = portcullis_pki::Certificate::first_and_rest(
        leaf(&fleet, "never-registered", Profile::Client).as_bytes(),
    )
    .unwrap()
    .0;
    let sight = |c: &portcullis_pki::Certificate, at| Sighting {
        certificate: c.clone(),
        domain: "api.test".into(),
        at,
    };
    store
        .record_sightings(&[
            sight(&seen_cert, 1_700_000_000),
            sight(&unregistered, 1_700_000_100),
        ])
        .await
        .unwrap();
    store
        .record_sightings(&[sight(&seen_cert, 1_600_000_000)])
        .await
        .unwrap();
    assert_eq!(
        store.certificate(&ids[3]).await.unwrap().last_seen,
        Some(1_700_000_000)
    );
    let seen = store.seen_since(1_700_000_000).await.unwrap();
    assert_eq!(seen.len(), 2, "{backend}");
    assert_eq!(seen[0].0.info().id, unregistered.info().id);
    assert_eq!(store.seen_since(1_700_000_050).await.unwrap().len(), 1);

    // Things: attributes, exclusive attachments, listing by thing, deletion rules.
    let attrs = std::collections::BTreeMap::from([("site".to_string(), "lyon".to_string())]);
    let thing = store.create_thing("pump-1", &attrs, "test").await.unwrap();
    assert_eq!(thing.attributes["site"], "lyon");
    assert!(matches!(
        store.create_thing("pump-1", &attrs, "test").await,
        Err(RegistryError::Conflict(_))
    ));
    for bad in ["", "a b", "x'; DROP TABLE things; --", "../etc", "\"x\""] {
        let r = store.create_thing(bad, &attrs, "test").await;
        assert!(matches!(r, Err(RegistryError::Invalid(_))), "{bad}: {r:?}");
    }
    store
        .create_thing("pump-2", &Default::default(), "test")
        .await
        .unwrap();
    store.attach("pump-1", &ids[3], true, "test").await.unwrap();
    let r = store.attach("pump-2", &ids[3], false, "test").await;
    assert!(
        matches!(r, Err(RegistryError::Conflict(_))),
        "{backend}: {r:?}"
    );
    store
        .attach("pump-2", &ids[4], false, "test")
        .await
        .unwrap();
    store
        .attach("pump-1", &ids[4], false, "test")
        .await
        .unwrap();
    let r = store.attach("pump-1", &ids[2], true, "test").await;
    assert!(r.is_ok(), "{r:?}");
    assert!(matches!(
        store.attach("nope", &ids[2], false, "test").await,
        Err(RegistryError::NotFound(_))
    ));
    let by_thing = store
        .list_certificates(&CertFilter {
            thing: Some("pump-1".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_thing.len(), 3, "{backend}");
    assert!(
        by_thing
            .iter()
            .all(|c| c.things.contains(&"pump-1".to_string()))
    );
    assert_eq!(
        store.certificate(&ids[4]).await.unwrap().things,
        vec!["pump-1".to_string(), "pump-2".to_string()]
    );
    let changed = store
        .update_thing(
            "pump-1",
            &std::collections::BTreeMap::from([
                ("site".to_string(), None),
                ("model".to_string(), Some("x2".to_string())),
            ]),
            "test",
        )
        .await
        .unwrap();
    assert_eq!(changed.attributes.len(), 1);
    assert_eq!(changed.version, 2);
    let r = store.delete_thing("pump-2", "test").await;
    assert!(
        matches!(r, Err(RegistryError::Invalid(ref m)) if m.contains("detach")),
        "{r:?}"
    );
    store.detach("pump-2", &ids[4], "test").await.unwrap();
    store.delete_thing("pump-2", "test").await.unwrap();
    assert_eq!(store.list_things(None, 100).await.unwrap().len(), 1);

    // Just-in-time provisioning: certificate, thing and attachment in one transaction.
    let template = ProvisioningTemplate::from_json(&serde_json::json!({
        "thing_name": "dev-${Certificate.Subject.CommonName}",
        "attributes": {"by": "jitp"}
    }))
    .unwrap();
    let newcomer = portcullis_pki::Certificate::first_and_rest(
        leaf(&fleet, "newcomer", Profile::Client).as_bytes(),
    )
    .unwrap()
    .0;
    let provisioned = template.resolve(&newcomer).unwrap();
    let rec = store
        .provision(&newcomer, &record.id, &provisioned, "gateway:jit")
        .await
        .unwrap();
    assert_eq!(rec.status, CertStatus::Active);
    let t = store.thing("dev-newcomer").await.unwrap();
    assert_eq!(t.certificates.len(), 1);
    assert_eq!(t.attributes["by"], "jitp");
    let r = store
        .provision(&newcomer, &record.id, &provisioned, "gateway:jit")
        .await;
    assert!(matches!(r, Err(RegistryError::Conflict(_))), "{r:?}");

    // CA updates: template, and deactivation that revokes what it issued.
    let (updated, revoked) = store
        .update_ca(
            &record.id,
            &CaUpdate {
                provisioning_template: Some(Some(template.clone())),
                ..Default::default()
            },
            "test",
        )
        .await
        .unwrap();
    assert_eq!(updated.provisioning_template.as_ref(), Some(&template));
    assert_eq!(revoked, 0);
    assert_eq!(
        store.ca(&record.id).await.unwrap().provisioning_template,
        Some(template)
    );
    let (updated, revoked) = store
        .update_ca(
            &record.id,
            &CaUpdate {
                status: Some(CaStatus::Inactive),
                auto_registration: Some(false),
                revoke_issued: true,
                ..Default::default()
            },
            "test",
        )
        .await
        .unwrap();
    assert_eq!(
        (updated.status, updated.auto_registration, updated.version),
        (CaStatus::Inactive, false, 3)
    );
    // ids[1..5] and the newcomer were not revoked yet (ids[0] was deleted).
    assert_eq!(revoked, 5, "{backend}");
    let revoked_now = store
        .list_certificates(&CertFilter {
            status: Some(CertStatus::Revoked),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(revoked_now.len(), 5);

    // Truststores: immutable numbered versions with lint warnings.
    let bundle = fleet.certificate().to_pem();
    let v1 = store
        .add_truststore_version("partners", &bundle, &[], true, "test")
        .await
        .unwrap();
    assert_eq!(v1.version, 1);
    assert!(matches!(
        store
            .add_truststore_version("partners", &bundle, &[], true, "test")
            .await,
        Err(RegistryError::Conflict(_))
    ));
    assert!(matches!(
        store
            .add_truststore_version("absent", &bundle, &[], false, "test")
            .await,
        Err(RegistryError::NotFound(_))
    ));
    let leaf_only = leaf(&fleet, "not-a-ca", Profile::Client);
    assert!(
        store
            .add_truststore_version("partners", &leaf_only, &[], false, "test")
            .await
            .is_err()
    );
    let both = format!("{bundle}{}", other.certificate().to_pem());
    let crl = portcullis_pki::crl::create(&fleet, &[], 7)
        .unwrap()
        .to_pem();
    let v2 = store
        .add_truststore_version("partners", &both, &[crl], false, "test")
        .await
        .unwrap();
    assert_eq!(v2.version, 2);
    assert_eq!(
        store
            .truststore_version("partners", None)
            .await
            .unwrap()
            .version,
        2
    );
    assert_eq!(
        store
            .truststore_version("partners", Some(1))
            .await
            .unwrap()
            .bundle,
        bundle
    );
    assert!(matches!(
        store
            .add_truststore_version("partners", &bundle, &["junk".into()], false, "test")
            .await,
        Err(RegistryError::Invalid(_))
    ));
    assert_eq!(
        store.list_truststores().await.unwrap(),
        vec![("partners".to_string(), 2)]
    );

    // Tokens: the secret works once made, never stored, and stops working when deleted.
    let (token, secret) = store.create_token("ci", "test").await.unwrap();
    assert!(secret.starts_with("pct_") && secret.len() == 68);
    assert_eq!(
        store.token_by_secret(&secret).await.unwrap().unwrap().id,
        token.id
    );
    assert!(store.token_by_secret("pct_nope").await.unwrap().is_none());
    assert!(store.token_by_secret(&secret).await.unwrap().unwrap().name == "ci");
    store.delete_token(&token.id, "test").await.unwrap();
    assert!(store.token_by_secret(&secret).await.unwrap().is_none());

    // Domains: seeded once, then versioned writes.
    assert!(!store.domains_seeded().await.unwrap());
    let marker = store.config_marker().await.unwrap();
    let spec: portcullis_registry::DomainSpec =
        serde_json::from_value(serde_json::json!({"hostname": "api.test", "certificate": "auto"}))
            .unwrap();
    assert_eq!(spec.security_policy, "TLS_1_2", "defaults are filled in");
    assert!(
        store
            .seed_domains(&[("api.test".into(), spec.clone())], "config")
            .await
            .unwrap()
    );
    assert!(
        !store
            .seed_domains(&[("other.test".into(), spec.clone())], "config")
            .await
            .unwrap()
    );
    assert_eq!(store.list_domains().await.unwrap().len(), 1);
    assert!(store.domains_seeded().await.unwrap());
    assert!(store.config_marker().await.unwrap() > marker);
    let d = store
        .put_domain("api.test", &spec, Some(1), "test")
        .await
        .unwrap();
    assert_eq!(d.version, 2);
    assert_eq!(store.domain("api.test").await.unwrap().spec, spec);
    assert!(matches!(
        store.put_domain("api.test", &spec, Some(1), "test").await,
        Err(RegistryError::Conflict(_))
    ));
    store
        .put_domain("new.test", &spec, Some(0), "test")
        .await
        .unwrap();
    assert!(matches!(
        store.delete_domain("new.test", Some(2), "test").await,
        Err(RegistryError::Conflict(_))
    ));
    store
        .delete_domain("new.test", Some(1), "test")
        .await
        .unwrap();
    assert!(matches!(
        store.domain("new.test").await,
        Err(RegistryError::NotFound(_))
    ));

    let log = store
        .audit_log(&AuditFilter {
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap();
    let provisioning = store
        .audit_log(&AuditFilter {
            action: Some("certificate.provision".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(provisioning.len(), 1, "{backend}");
    let cause = log
        .iter()
        .filter(|e| {
            e.after
                .as_deref()
                .is_some_and(|a| a.contains("ca-revoke-issued"))
        })
        .count();
    assert_eq!(cause, 5, "{backend}");
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
                && e.target == ids[0].as_str()
                && e.after.as_deref().is_some_and(|a| a.contains("REVOKED"))
        })
        .unwrap();
    assert!(revoke.before.as_deref().unwrap().contains("INACTIVE"));
    assert!("nope".parse::<CertId>().is_err());
    policies(&store, backend).await;
    webhooks(&store, backend).await;
    acme(&store).await;
}

/// ACME's shared state: one node at a time holds a domain's lease (taken over once expired),
/// the first account recorded wins, challenge answers are published and withdrawn as
/// configuration changes, and expired ones are not served.
async fn acme(store: &Store) {
    use portcullis_registry::store::AcmeChallenge;
    assert!(
        store
            .acquire_lease("acme:a.test", "node-1", 60_000)
            .await
            .unwrap()
    );
    assert!(
        !store
            .acquire_lease("acme:a.test", "node-2", 60_000)
            .await
            .unwrap()
    );
    // The holder extends its own lease.
    assert!(
        store
            .acquire_lease("acme:a.test", "node-1", 60_000)
            .await
            .unwrap()
    );
    // Another domain's lease is separate.
    assert!(
        store
            .acquire_lease("acme:b.test", "node-2", 60_000)
            .await
            .unwrap()
    );
    // Released by someone else: nothing happens; by its holder: free.
    store.release_lease("acme:a.test", "node-2").await.unwrap();
    assert!(
        !store
            .acquire_lease("acme:a.test", "node-2", 60_000)
            .await
            .unwrap()
    );
    store.release_lease("acme:a.test", "node-1").await.unwrap();
    assert!(
        store
            .acquire_lease("acme:a.test", "node-2", 60_000)
            .await
            .unwrap()
    );
    // An expired lease (its holder died) is taken over.
    assert!(
        store
            .acquire_lease("acme:c.test", "node-1", -1)
            .await
            .unwrap()
    );
    assert!(
        store
            .acquire_lease("acme:c.test", "node-2", 60_000)
            .await
            .unwrap()
    );
    assert!(
        !store
            .acquire_lease("acme:c.test", "node-1", 60_000)
            .await
            .unwrap()
    );

    let dir = "https://acme.test/directory";
    assert_eq!(store.acme_account(dir).await.unwrap(), None);
    assert_eq!(
        store.init_acme_account(dir, "first").await.unwrap(),
        "first"
    );
    assert_eq!(
        store.init_acme_account(dir, "second").await.unwrap(),
        "first"
    );

    let marker = store.config_marker().await.unwrap();
    let now = portcullis_registry::store::now_ms();
    let live = AcmeChallenge {
        token: "tok-1".into(),
        hostname: "a.test".into(),
        kind: "tls-alpn-01".into(),
        key_authorization: "tok-1.thumb".into(),
        expires_ms: now + 600_000,
    };
    let expired = AcmeChallenge {
        token: "tok-2".into(),
        expires_ms: now - 1,
        ..live.clone()
    };
    store
        .put_acme_challenges(&[live.clone(), expired], "node:acme")
        .await
        .unwrap();
    assert!(
        store.config_marker().await.unwrap() > marker,
        "a configuration change"
    );
    assert_eq!(store.acme_challenges().await.unwrap(), vec![live.clone()]);
    // A new order's answer for the same name replaces the old one.
    let newer = AcmeChallenge {
        token: "tok-3".into(),
        key_authorization: "tok-3.thumb".into(),
        ..live.clone()
    };
    store
        .put_acme_challenges(std::slice::from_ref(&newer), "node:acme")
        .await
        .unwrap();
    assert_eq!(store.acme_challenges().await.unwrap(), vec![newer]);
    store
        .put_acme_challenges(std::slice::from_ref(&live), "node:acme")
        .await
        .unwrap();
    let marker = store.config_marker().await.unwrap();
    store
        .clear_acme_challenges("a.test", &["tok-1".to_string()], "node:acme")
        .await
        .unwrap();
    assert!(store.acme_challenges().await.unwrap().is_empty());
    assert!(store.config_marker().await.unwrap() > marker);
    // Nothing left to withdraw: no change recorded.
    let marker = store.config_marker().await.unwrap();
    store
        .clear_acme_challenges("a.test", &["tok-1".to_string()], "node:acme")
        .await
        .unwrap();
    assert_eq!(store.config_marker().await.unwrap(), marker);
}

/// Webhooks: events only for committed changes, fan-out once, leases, retries until failed,
/// replays, expiry notices once per item.
async fn webhooks(store: &Store, backend: &str) {
    let bad = store
        .create_webhook(
            &NewWebhook {
                name: "w",
                url: "ftp://x",
                events: &["ca.registered".into()],
                expiring_days: 30,
                ca_pem: "",
                topic_filter: None,
            },
            "test",
        )
        .await;
    assert!(matches!(bad, Err(RegistryError::Invalid(_))), "{backend}");
    let bad = store
        .create_webhook(
            &NewWebhook {
                name: "w",
                url: "http://127.0.0.1:9/x",
                events: &["nope".into()],
                expiring_days: 30,
                ca_pem: "",
                topic_filter: None,
            },
            "test",
        )
        .await;
    assert!(matches!(bad, Err(RegistryError::Invalid(m)) if m.contains("unknown event")));
    let events = vec![
        "certificate.registered".to_string(),
        "certificate.pending_activation".to_string(),
        "certificate.expiring".to_string(),
    ];
    let (hook, secret) = store
        .create_webhook(
            &NewWebhook {
                name: "w",
                url: "http://127.0.0.1:9/x",
                events: &events,
                expiring_days: 3650,
                ca_pem: "",
                topic_filter: None,
            },
            "test",
        )
        .await
        .unwrap();
    assert!(secret.starts_with("whsec_"));
    // Whatever happened before the subscription is fanned out to nobody.
    store.fan_out_events(10_000).await.unwrap();
    assert!(store.deliveries("w", None, 100).await.unwrap().is_empty());

    let issuer = ca("Webhook CA");
    let pem = leaf(&issuer, "hooked", Profile::Client);
    store
        .register_certificate(pem.as_bytes(), CertStatus::PendingActivation, "test")
        .await
        .unwrap();
    // A failed change (a duplicate) writes no event.
    assert!(
        store
            .register_certificate(pem.as_bytes(), CertStatus::Active, "test")
            .await
            .is_err()
    );
    assert_eq!(store.fan_out_events(100).await.unwrap(), 1, "{backend}");
    assert_eq!(
        store.fan_out_events(100).await.unwrap(),
        0,
        "fanned out once"
    );
    let listed = store.deliveries(&hook.id, None, 100).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].event_type, "certificate.pending_activation");
    assert_eq!(listed[0].payload["after"]["status"], "PENDING_ACTIVATION");

    // Claimed once (leased), retried with backoff, failed after the last attempt.
    let due = store.claim_due_deliveries(10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].secret, secret);
    assert!(
        store.claim_due_deliveries(10).await.unwrap().is_empty(),
        "leased"
    );
    for attempt in 1..=portcullis_registry::MAX_ATTEMPTS {
        store
            .record_delivery_attempt(&due[0].id, Err((Some(500), "HTTP 500".into())))
            .await
            .unwrap();
        let d = store.delivery(&due[0].id).await.unwrap();
        assert_eq!(d.attempts, attempt);
        let expected = if attempt == portcullis_registry::MAX_ATTEMPTS {
            "failed"
        } else {
            "pending"
        };
        assert_eq!(d.status, expected);
        assert!(d.next_attempt_at > d.updated_at, "backoff");
    }
    let failed = store.deliveries("w", Some("failed"), 10).await.unwrap();
    assert_eq!(failed.len(), 1, "{backend}");
    assert!(store.deliveries("w", Some("bogus"), 10).await.is_err());
    let replay = store.replay_delivery(&due[0].id, "test").await.unwrap();
    assert_eq!(replay.replay_of.as_deref(), Some(due[0].id.as_str()));
    assert_eq!((replay.status.as_str(), replay.attempts), ("pending", 0));
    let due = store.claim_due_deliveries(10).await.unwrap();
    assert_eq!(due.len(), 1);
    store
        .record_delivery_attempt(&due[0].id, Ok(204))
        .await
        .unwrap();
    assert_eq!(
        store.delivery(&due[0].id).await.unwrap().status,
        "delivered"
    );

    // Revoking what a CA issued notifies each certificate's status change.
    store
        .update_webhook(
            "w",
            &portcullis_registry::WebhookUpdate {
                events: Some(vec![
                    "certificate.status_changed".into(),
                    "certificate.expiring".into(),
                ]),
                ..Default::default()
            },
            "test",
        )
        .await
        .unwrap();
    let hook_ca = store
        .register_ca(
            CaRegistration {
                certificate: issuer.certificate().to_pem().as_bytes(),
                verification: None,
                allow_unverified: true,
                activate: true,
                auto_registration: false,
                provisioning_template: None,
            },
            "test",
        )
        .await
        .unwrap();
    let batch: Vec<String> = (0..3)
        .map(|i| leaf(&issuer, &format!("batch-{i}"), Profile::Client))
        .collect();
    let mut pems: Vec<&[u8]> = batch.iter().map(|p| p.as_bytes()).collect();
    pems.push(b"not a certificate");
    pems.push(batch[0].as_bytes());
    let results = store
        .register_certificates(&pems, CertStatus::Active, "test")
        .await
        .unwrap();
    assert_eq!(results.len(), 5);
    assert!(results[..3].iter().all(Result::is_ok), "{backend}");
    assert!(
        results[..3]
            .iter()
            .all(|r| r.as_ref().unwrap().ca_id.as_ref() == Some(&hook_ca.id)),
        "linked to the CA that signed them"
    );
    assert!(matches!(results[3], Err(RegistryError::Pki(_))));
    assert!(
        matches!(results[4], Err(RegistryError::Conflict(_))),
        "a duplicate in the batch"
    );
    store
        .update_ca(
            &hook_ca.id,
            &CaUpdate {
                status: Some(CaStatus::Inactive),
                revoke_issued: true,
                ..Default::default()
            },
            "test",
        )
        .await
        .unwrap();
    store.fan_out_events(1000).await.unwrap();
    let revoked = store
        .deliveries("w", Some("pending"), 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|d| {
            d.event_type == "certificate.status_changed"
                && d.payload["after"]["cause"] == "ca-revoke-issued"
        })
        .count();
    assert_eq!(revoked, 3, "{backend}");

    // Expiring within ten years: every unrevoked certificate, once.
    let made = store.check_expiring().await.unwrap();
    assert!(made >= 1, "{backend}");
    assert_eq!(store.check_expiring().await.unwrap(), 0, "told once");

    // Disabled webhooks get nothing new; deleting removes the deliveries.
    store
        .update_webhook(
            "w",
            &portcullis_registry::WebhookUpdate {
                enabled: Some(false),
                ..Default::default()
            },
            "test",
        )
        .await
        .unwrap();
    assert!(store.claim_due_deliveries(100).await.unwrap().is_empty());
    // Forwarding rules: mqtt.message needs a topic filter; queued messages become deliveries.
    assert!(matches!(
        store
            .create_webhook(&NewWebhook { name: "r", url: "http://127.0.0.1:9/r", events: &["mqtt.message".into()], expiring_days: 30, ca_pem: "", topic_filter: None }, "test")
            .await,
        Err(RegistryError::Invalid(m)) if m.contains("topic filter")
    ));
    let (rule, _) = store
        .create_webhook(
            &NewWebhook {
                name: "r",
                url: "http://127.0.0.1:9/r",
                events: &["mqtt.message".into()],
                expiring_days: 30,
                ca_pem: "",
                topic_filter: Some("devices/+/telemetry"),
            },
            "test",
        )
        .await
        .unwrap();
    assert_eq!(
        store.message_rules().await.unwrap(),
        [(rule.id.clone(), "devices/+/telemetry".to_string())]
    );
    store
        .enqueue_message_deliveries(&[
            (
                rule.id.clone(),
                r#"{"topic":"devices/d1/telemetry"}"#.into(),
            ),
            ("wh_gone".into(), "{}".into()),
        ])
        .await
        .unwrap();
    let queued = store.deliveries("r", Some("pending"), 10).await.unwrap();
    assert_eq!(queued.len(), 1, "the unknown rule is skipped: {backend}");
    assert_eq!(queued[0].payload["topic"], "devices/d1/telemetry");
    store.delete_webhook("r", "test").await.unwrap();
    store.delete_webhook("w", "test").await.unwrap();
    assert!(store.list_webhooks().await.unwrap().is_empty());
}

/// Policies: validated documents, at most five versions, attachments to existing targets only,
/// no deletion while attached, attachments gone with their target.
async fn policies(store: &Store, backend: &str) {
    let doc = r#"{"Statement": [{"Effect": "Allow", "Action": "http:GET", "Resource": "route:api.test/${cert:Subject.O}/*"}]}"#;
    let bad = r#"{"Statement": [{"Effect": "Allow", "Action": "ftp:GET", "Resource": "route:x"}]}"#;
    assert!(matches!(
        store.create_policy("bad", bad, "test").await,
        Err(RegistryError::Invalid(m)) if m.contains("Statement[0].Action: unknown action")
    ));
    assert!(store.create_policy("bad'name", doc, "test").await.is_err());
    let p = store.create_policy("partners", doc, "test").await.unwrap();
    assert_eq!((p.default_version, p.versions.len()), (1, 1), "{backend}");
    assert!(matches!(
        store.create_policy("partners", doc, "test").await,
        Err(RegistryError::Conflict(_))
    ));
    for _ in 0..4 {
        store
            .create_policy_version("partners", doc, false, "test")
            .await
            .unwrap();
    }
    assert!(matches!(
        store.create_policy_version("partners", doc, true, "test").await,
        Err(RegistryError::Conflict(m)) if m.contains("5 versions")
    ));
    assert!(matches!(
        store.delete_policy_version("partners", 1, "test").await,
        Err(RegistryError::Conflict(_))
    ));
    let p = store
        .set_default_policy_version("partners", 3, "test")
        .await
        .unwrap();
    assert_eq!(p.default_version, 3);
    store
        .delete_policy_version("partners", 1, "test")
        .await
        .unwrap();
    let p = store
        .create_policy_version("partners", doc, true, "test")
        .await
        .unwrap();
    assert_eq!(p.default_version, 6, "numbers are never reused");
    assert!(matches!(
        store.policy("partners", Some(1)).await,
        Err(RegistryError::NotFound(_))
    ));

    // Attachments.
    let thing = PolicyTarget {
        target_type: TargetType::Thing,
        target: "policy-thing".into(),
    };
    assert!(matches!(
        store.attach_policy("partners", &thing, "test").await,
        Err(RegistryError::NotFound(_))
    ));
    store
        .create_thing("policy-thing", &Default::default(), "test")
        .await
        .unwrap();
    store
        .attach_policy("partners", &thing, "test")
        .await
        .unwrap();
    assert!(matches!(
        store.attach_policy("partners", &thing, "test").await,
        Err(RegistryError::Conflict(_))
    ));
    assert_eq!(store.policies_of(&thing).await.unwrap(), ["partners"]);
    assert!(matches!(
        store.delete_policy("partners", "test").await,
        Err(RegistryError::Conflict(m)) if m.contains("thing policy-thing")
    ));
    let state = store.policy_state().await.unwrap();
    assert_eq!(state.policies.len(), 1, "{backend}");
    assert_eq!(state.policies[0].1, 6);
    assert_eq!(state.attachments, [("partners".to_string(), thing.clone())]);
    // Deleting the thing removes the attachment: a new thing of that name starts clean.
    store.delete_thing("policy-thing", "test").await.unwrap();
    assert!(store.policies_of(&thing).await.unwrap().is_empty());
    store.delete_policy("partners", "test").await.unwrap();
    assert!(store.list_policies().await.unwrap().is_empty());
    fleet_provisioning(store).await;
}

/// Templates, claims, ownership tokens spent once, refusals that make nothing, and the sweep
/// of certificates whose token expired unspent.
async fn fleet_provisioning(store: &Store) {
    use portcullis_registry::fleet::FleetTemplate;
    let backend = store.backend();
    let template = FleetTemplate::from_json(&serde_json::json!({
        "thing_name": "fleet-${param:Serial}",
        "parameters": {"Serial": {}},
        "policies": ["fleet-devices"],
    }))
    .unwrap();
    store
        .create_fleet_template("line-7", "", true, &template, "test")
        .await
        .unwrap();
    assert!(matches!(
        store
            .create_fleet_template("line-7", "", true, &template, "test")
            .await,
        Err(RegistryError::Conflict(_))
    ));
    let disabled = store
        .update_fleet_template(
            "line-7",
            &portcullis_registry::FleetTemplateUpdate {
                enabled: Some(false),
                ..Default::default()
            },
            "test",
        )
        .await
        .unwrap();
    assert!(!disabled.enabled && disabled.version == 2, "{backend}");

    // A claim certificate, then a device's certificate with its token.
    let factory = ca("Factory CA");
    let claim_pem = leaf(&factory, "claim", Profile::Client);
    let claim = store
        .register_certificate(claim_pem.as_bytes(), CertStatus::Active, "test")
        .await
        .unwrap();
    store
        .set_certificate_claim(&claim.id, Some(&["line-7".to_string()]), "test")
        .await
        .unwrap();
    assert_eq!(
        store.claims().await.unwrap(),
        [(claim.id.clone(), vec!["line-7".to_string()])]
    );
    let device_pem = leaf(&factory, "device-1", Profile::Client);
    let device = portcullis_pki::Certificate::first_and_rest(device_pem.as_bytes())
        .unwrap()
        .0;
    let (record, token) = store
        .register_fleet_certificate(&device, claim.id.as_str(), "test")
        .await
        .unwrap();
    assert_eq!(record.status, CertStatus::PendingActivation, "{backend}");
    assert_eq!(
        store.ownership_token(&token).await.unwrap(),
        Some(record.id.clone())
    );
    assert_eq!(store.ownership_token("forged").await.unwrap(), None);
    let plan = template
        .plan(
            &device,
            &[("Serial".to_string(), "7".to_string())]
                .into_iter()
                .collect(),
        )
        .unwrap();
    // A missing policy refuses the whole registration: no thing, the token still good.
    assert!(matches!(
        store.register_fleet_thing(&token, &record.id, &plan, "test").await,
        Err(RegistryError::Invalid(m)) if m.contains("fleet-devices")
    ));
    assert!(matches!(
        store.thing("fleet-7").await,
        Err(RegistryError::NotFound(_))
    ));
    assert!(store.ownership_token(&token).await.unwrap().is_some());
    store
        .create_policy(
            "fleet-devices",
            r#"{"Statement": [{"Effect": "Allow", "Action": "mqtt:Connect", "Resource": "*"}]}"#,
            "test",
        )
        .await
        .unwrap();
    let registered = store
        .register_fleet_thing(&token, &record.id, &plan, "test")
        .await
        .unwrap();
    assert_eq!(registered.status, CertStatus::Active, "{backend}");
    assert_eq!(registered.things, ["fleet-7"]);
    let thing = PolicyTarget {
        target_type: TargetType::Thing,
        target: "fleet-7".into(),
    };
    assert_eq!(store.policies_of(&thing).await.unwrap(), ["fleet-devices"]);
    // Spent: once only.
    assert!(matches!(
        store.register_fleet_thing(&token, &record.id, &plan, "test").await,
        Err(RegistryError::Conflict(m)) if m.contains("ownership token")
    ));

    // A certificate never registered goes once its token expired, and only then.
    let other = portcullis_pki::Certificate::first_and_rest(
        leaf(&factory, "device-2", Profile::Client).as_bytes(),
    )
    .unwrap()
    .0;
    let (pending, _) = store
        .register_fleet_certificate(&other, claim.id.as_str(), "test")
        .await
        .unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert_eq!(
        store
            .sweep_unclaimed_certificates(now, "test")
            .await
            .unwrap(),
        0
    );
    let later = now + portcullis_registry::OWNERSHIP_TOKEN_SECONDS + 1;
    assert_eq!(
        store
            .sweep_unclaimed_certificates(later, "test")
            .await
            .unwrap(),
        1
    );
    assert!(matches!(
        store.certificate(&pending.id).await,
        Err(RegistryError::NotFound(_))
    ));
    assert_eq!(
        store.certificate(&record.id).await.unwrap().status,
        CertStatus::Active
    );
    // Renewal counts at a given time: the device's certificate (a year) is due two thirds in,
    // overdue once expired; a renewal counts as issued.
    let counts = store.renewal_counts(now).await.unwrap();
    assert_eq!(counts.renewed, 0, "{backend}");
    let late = now + 300 * 24 * 3600;
    let due = store.renewal_counts(late).await.unwrap();
    assert!(due.due >= 1, "{backend}: {due:?}");
    let expired = store.renewal_counts(now + 400 * 24 * 3600).await.unwrap();
    assert!(expired.overdue >= 1, "{backend}: {expired:?}");
    let renewal = portcullis_pki::Certificate::first_and_rest(
        leaf(&factory, "device-1", Profile::Client).as_bytes(),
    )
    .unwrap()
    .0;
    store
        .register_renewal(&renewal, &record.id, "test", true)
        .await
        .unwrap();
    let after = store.renewal_counts(late).await.unwrap();
    assert_eq!(after.renewed, 1, "{backend}");
    // The renewed certificate no longer counts; its renewal, as young, counts in its place.
    assert_eq!(after.due, due.due, "{backend}");

    // A template's renewal terms: due at half its lifetime, early renewals refused, a new key
    // required, ten days of grace, and an overlap of an hour.
    let rotating = portcullis_registry::fleet::FleetTemplate::from_json(&serde_json::json!({
        "thing_name": "${cert:Subject.CN}",
        "renewal": {"due_after_percent": 50, "refuse_early": true, "grace_days": 10,
                    "overlap_hours": 1, "require_new_key": true}
    }))
    .unwrap();
    assert!(
        portcullis_registry::fleet::FleetTemplate::from_json(
            &serde_json::json!({"thing_name": "x", "renewal": {"due_after_percent": 100}})
        )
        .is_err()
    );
    store
        .create_fleet_template("rotating", "", true, &rotating, "test")
        .await
        .unwrap();
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let same_key = |days: u32| {
        let mut req = IssueRequest::new(Profile::Client, SubjectName::cn("device-3"));
        req.days = days;
        issue::issue(&req, &key, Some(&factory)).unwrap()
    };
    let device3 = same_key(100);
    let (record3, token3) = store
        .register_fleet_certificate(&device3, claim.id.as_str(), "test")
        .await
        .unwrap();
    let mut plan3 = rotating.plan(&device3, &Default::default()).unwrap();
    plan3.template = Some("rotating".into());
    store
        .register_fleet_thing(&token3, &record3.id, &plan3, "test")
        .await
        .unwrap();
    let terms = store.renewal_terms(&record3.id).await.unwrap();
    assert_eq!(terms.template.as_deref(), Some("rotating"), "{backend}");
    let lifetime = record3.not_after - record3.created_at;
    assert!(
        (terms.due_at - (record3.created_at + lifetime / 2)).abs() <= 1,
        "{backend}: {terms:?}"
    );
    assert_eq!(
        terms.grace_until,
        record3.not_after + 10 * 86400,
        "{backend}"
    );
    assert!(terms.settings.refuse_early && terms.settings.require_new_key);
    let renewed_new_key = portcullis_pki::Certificate::first_and_rest(
        leaf(&factory, "device-3", Profile::Client).as_bytes(),
    )
    .unwrap()
    .0;
    assert!(matches!(
        store.register_renewal(&renewed_new_key, &record3.id, "test", true).await,
        Err(RegistryError::Invalid(m)) if m.contains("not due")
    ));
    assert!(matches!(
        store.register_renewal(&same_key(100), &record3.id, "test", false).await,
        Err(RegistryError::Invalid(m)) if m.contains("new key")
    ));
    let renewal3 = store
        .register_renewal(&renewed_new_key, &record3.id, "test", false)
        .await
        .unwrap();
    let inherited = store.renewal_terms(&renewal3.id).await.unwrap();
    assert_eq!(inherited.template.as_deref(), Some("rotating"), "{backend}");
    // Not back to a key the device used before either (A→B→A).
    assert!(matches!(
        store.register_renewal(&same_key(100), &renewal3.id, "test", false).await,
        Err(RegistryError::Invalid(m)) if m.contains("new key")
    ));
    // The overlap ends by time even though the renewal was never seen.
    assert!(store.end_overlaps(now, "test").await.unwrap().is_empty());
    let ended = store.end_overlaps(now + 3601, "test").await.unwrap();
    assert_eq!(
        ended,
        [(record3.id.clone(), renewal3.id.clone())],
        "{backend}"
    );
    assert_eq!(
        store.certificate(&record3.id).await.unwrap().status,
        CertStatus::Inactive
    );
    // Expired within its grace: counted in grace, not overdue; past it, overdue.
    let in_grace = store
        .renewal_counts(renewal3.not_after + 5 * 86400)
        .await
        .unwrap();
    let past = store
        .renewal_counts(renewal3.not_after + 11 * 86400)
        .await
        .unwrap();
    assert_eq!(in_grace.in_grace, 1, "{backend}: {in_grace:?}");
    assert_eq!(past.in_grace, 0, "{backend}: {past:?}");
    assert_eq!(past.overdue, in_grace.overdue + 1, "{backend}");
    store
        .set_certificate_claim(&claim.id, None, "test")
        .await
        .unwrap();
    assert!(store.claims().await.unwrap().is_empty());
    store.delete_fleet_template("line-7", "test").await.unwrap();
    store
        .delete_fleet_template("rotating", "test")
        .await
        .unwrap();
    assert!(store.list_fleet_templates().await.unwrap().is_empty());
}

#[tokio::test]
async fn store_suite_on_sqlite() {
    let dir = portcullis_testkit::temp_dir();
    let path = dir.path().join("registry.db");
    let store = Store::open(path.to_str().unwrap()).await.unwrap();
    suite(store).await;
    // Reopening applies no migration twice and keeps the data.
    let store = Store::open(path.to_str().unwrap()).await.unwrap();
    assert_eq!(store.list_cas().await.unwrap().len(), 3);
}

/// A stored domain this version cannot read (written by a newer one, or by hand) is named in the
/// error with what to do, and can still be deleted or replaced: the change never reads it.
#[tokio::test]
async fn a_stored_domain_that_cannot_be_read_can_be_deleted_or_replaced() {
    let dir = portcullis_testkit::temp_dir();
    let path = dir.path().join("registry.db");
    let store = Store::open(path.to_str().unwrap()).await.unwrap();
    let spec: portcullis_registry::DomainSpec =
        serde_json::from_value(serde_json::json!({"hostname": "a.test", "certificate": "auto"}))
            .unwrap();
    store
        .put_domain("a.test", &spec, Some(0), "test")
        .await
        .unwrap();
    let b = portcullis_registry::DomainSpec {
        hostname: "b.test".into(),
        ..spec.clone()
    };
    store
        .put_domain("b.test", &b, Some(0), "test")
        .await
        .unwrap();
    let raw = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    for host in ["a.test", "b.test"] {
        sqlx::query("UPDATE domains SET spec = $1 WHERE hostname = $2")
            .bind(format!(
                r#"{{"hostname": "{host}", "certificate": "auto", "quic": true}}"#
            ))
            .bind(host)
            .execute(&raw)
            .await
            .unwrap();
    }
    let err = store.domain("a.test").await.unwrap_err().to_string();
    assert!(
        err.contains("'a.test'") && err.contains("quic") && err.contains("domain delete"),
        "{err}"
    );
    store
        .delete_domain("a.test", Some(1), "test")
        .await
        .unwrap();
    let (others, version) = store.domains_except("b.test").await.unwrap();
    assert!(others.is_empty());
    assert_eq!(version, 1);
    let replaced = store
        .put_domain("b.test", &b, Some(1), "test")
        .await
        .unwrap();
    assert_eq!((replaced.version, replaced.spec), (2, b));
}

/// The database holds webhook secrets and the registration code: owner-only, its WAL and shared
/// memory files too, and an existing world-readable file is narrowed when opened.
#[tokio::test]
async fn the_registry_database_and_its_wal_are_readable_by_their_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = portcullis_testkit::temp_dir();
    let mode = |name: &str| {
        std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    let path = dir.path().join("registry.db");
    let store = Store::open(path.to_str().unwrap()).await.unwrap();
    store.registration_code().await.unwrap();
    for name in ["registry.db", "registry.db-wal", "registry.db-shm"] {
        assert_eq!(mode(name), 0o600, "{name}");
    }
    drop(store);
    let older = dir.path().join("older.db");
    std::fs::write(&older, b"").unwrap();
    std::fs::set_permissions(&older, std::fs::Permissions::from_mode(0o644)).unwrap();
    let _store = Store::open(older.to_str().unwrap()).await.unwrap();
    assert_eq!(mode("older.db"), 0o600);
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
    assert_eq!(store.list_cas().await.unwrap().len(), 3);
    drop(store);
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await;
}

/// Webhook signing secrets in a shared registry are sealed with the cluster key: those kept in
/// clear from before are sealed when the key is given, new ones are sealed at once, and both
/// still sign; a node without the key cannot read them.
#[tokio::test]
async fn webhook_secrets_are_sealed_with_the_cluster_key() {
    let dir = portcullis_testkit::temp_dir();
    let path = dir.path().join("registry.db");
    let store = Store::open(path.to_str().unwrap()).await.unwrap();
    let new = |name: &'static str| NewWebhook {
        name,
        url: "https://hooks.example.com/x",
        events: &[],
        expiring_days: 30,
        ca_pem: "",
        topic_filter: None,
    };
    let events = ["ca.registered".to_string()];
    let before = NewWebhook {
        events: &events,
        ..new("before")
    };
    let (_, clear_secret) = store.create_webhook(&before, "test").await.unwrap();
    let raw = |name: &str| {
        let conn = std::process::Command::new("sqlite3")
            .arg(&path)
            .arg(format!("SELECT secret FROM webhooks WHERE name = '{name}'"))
            .output();
        conn.ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let key = std::sync::Arc::new(
        portcullis_registry::sealed::ClusterKey::parse(
            &portcullis_registry::sealed::ClusterKey::generate().unwrap(),
        )
        .unwrap(),
    );
    assert_eq!(store.seal_secrets_with(key.clone()).await.unwrap(), 1);
    let after = NewWebhook {
        events: &events,
        ..new("after")
    };
    let (_, new_secret) = store.create_webhook(&after, "test").await.unwrap();
    for (name, secret) in [("before", &clear_secret), ("after", &new_secret)] {
        assert_eq!(&store.webhook_target(name).await.unwrap().1, secret);
        if let Some(kept) = raw(name) {
            assert!(
                kept.starts_with("v1.") && !kept.contains(secret.as_str()),
                "{kept}"
            );
        }
    }
    // Another store on the same file without the key cannot open them.
    let keyless = Store::open(path.to_str().unwrap()).await.unwrap();
    assert!(keyless.webhook_target("after").await.is_err());
}
