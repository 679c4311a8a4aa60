//! Webhooks in the store: the event outbox (written by `audit` in the change's own transaction),
//! subscriptions, the fan-out of events to deliveries, claiming due deliveries (with a lease, so
//! several gateway nodes never send one twice at once), recording attempts, replays, and the
//! expiry check.

use serde::Serialize;
use serde_json::{Value, json};
use sqlx::Row;

use super::admin::random_hex;
use super::{Store, audit, conflict_or, now, with_pool};
use crate::RegistryError;
use crate::audit::AuditAction;
use crate::model::check_name;

/// Every event a webhook can subscribe to.
pub const EVENT_TYPES: &[&str] = &[
    "certificate.registered",
    "certificate.pending_activation",
    "certificate.status_changed",
    "certificate.expiring",
    "ca.registered",
    "ca.status_changed",
    "ca.expiring",
    "truststore.version_added",
    "mqtt.message",
    "provisioning.pre_provision",
];

/// Attempts before a delivery is marked failed.
pub const MAX_ATTEMPTS: i64 = 8;

/// Seconds to wait after the n-th failed attempt (the last value repeats).
const BACKOFF: &[i64] = &[5, 30, 120, 600, 1800, 3600, 3 * 3600];

/// How long a node may hold a claimed delivery before another may take it over.
const LEASE_SECONDS: i64 = 120;

/// The webhook event a change amounts to, if any.
pub(crate) fn event_of(
    action: AuditAction,
    before: Option<&str>,
    after: Option<&str>,
) -> Option<&'static str> {
    let status = |text: Option<&str>| {
        text.and_then(|t| serde_json::from_str::<Value>(t).ok())
            .and_then(|v| v["status"].as_str().map(str::to_string))
    };
    use AuditAction as A;
    match action {
        A::CertificateRegister => Some(if status(after).as_deref() == Some("PENDING_ACTIVATION") {
            "certificate.pending_activation"
        } else {
            "certificate.registered"
        }),
        A::CertificateProvision => Some("certificate.registered"),
        A::CertificateStatus => Some("certificate.status_changed"),
        A::CaRegister => Some("ca.registered"),
        A::CaUpdate if status(before) != status(after) => Some("ca.status_changed"),
        A::TruststoreCreate | A::TruststoreVersion => Some("truststore.version_added"),
        A::CaUpdate
        | A::CertificateDelete
        | A::CertificateProvisionRefused
        | A::ThingCreate
        | A::ThingUpdate
        | A::ThingDelete
        | A::ThingAttach
        | A::ThingDetach
        | A::PolicyCreate
        | A::PolicyVersion
        | A::PolicyDefault
        | A::PolicyDeleteVersion
        | A::PolicyDelete
        | A::PolicyAttach
        | A::PolicyDetach
        | A::WebhookCreate
        | A::WebhookUpdate
        | A::WebhookDelete
        | A::WebhookReplay
        | A::TokenCreate
        | A::TokenDelete
        | A::AdminCertificateIssue
        | A::AdminCertificateRevoke
        | A::DomainCreate
        | A::DomainUpdate
        | A::DomainDelete
        | A::TruststoreDelete
        | A::ServerCertImport
        | A::ServerCertDelete
        | A::CertificateClaim
        // Not yet the device's: `certificate.registered` comes when it registers (provision).
        | A::CertificateFleetCreate
        | A::FleetTemplateCreate
        | A::FleetTemplateUpdate
        | A::FleetTemplateDelete
        | A::EnrollmentCodeCreate
        | A::CertificateRenewalTerms
        | A::AcmeChallenge => None,
    }
}

/// The JSON an event carries: what changed, who changed it, before and after.
pub(crate) fn event_payload(
    event: &str,
    at: i64,
    actor: &str,
    target: &str,
    before: Option<&str>,
    after: Option<&str>,
) -> String {
    let parse = |t: Option<&str>| {
        t.map(|t| serde_json::from_str::<Value>(t).unwrap_or_else(|_| Value::String(t.into())))
            .unwrap_or(Value::Null)
    };
    json!({
        "event": event,
        "occurred_at": at,
        "actor": actor,
        "target": target,
        "before": parse(before),
        "after": parse(after),
    })
    .to_string()
}

/// A webhook subscription (its secret is shown once, at creation).
#[derive(Debug, Clone, Serialize)]
pub struct Webhook {
    /// `wh_` and 16 hex characters.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Where events are POSTed.
    pub url: String,
    /// The event types it receives.
    pub events: Vec<String>,
    /// For `*.expiring` events: how many days ahead.
    pub expiring_days: i64,
    /// Whether deliveries are made.
    pub enabled: bool,
    /// Whether the receiver's certificate is checked against a CA bundle of its own.
    pub custom_ca: bool,
    /// For `mqtt.message`: the topic filter of the messages it receives (a forwarding rule).
    pub topic_filter: Option<String>,
    /// When it was created.
    pub created_at: i64,
    /// When it last changed.
    pub updated_at: i64,
    /// Incremented on every change.
    pub version: i64,
}

/// A delivery of one event to one webhook, with its attempts.
#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    /// `dl_` and 20 hex characters.
    pub id: String,
    /// The webhook.
    pub webhook_id: String,
    /// The event type.
    pub event_type: String,
    /// pending, delivered or failed.
    pub status: String,
    /// Attempts made.
    pub attempts: i64,
    /// When the next attempt is due (pending only).
    pub next_attempt_at: i64,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// The HTTP status of the last attempt, if one came back.
    pub last_status: Option<i64>,
    /// When it was made.
    pub created_at: i64,
    /// When it last changed.
    pub updated_at: i64,
    /// The delivery it replays.
    pub replay_of: Option<String>,
    /// The event.
    pub payload: Value,
}

/// A claimed delivery with what sending it needs.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    /// The delivery id.
    pub id: String,
    /// The event type.
    pub event_type: String,
    /// The event JSON.
    pub payload: String,
    /// Attempts made before this one.
    pub attempts: i64,
    /// The receiver.
    pub url: String,
    /// The signing secret.
    pub secret: String,
    /// The receiver's CA bundle (empty: the system's roots).
    pub ca_pem: String,
}

/// A webhook to create.
#[derive(Debug, Clone, Copy)]
pub struct NewWebhook<'a> {
    /// Unique name.
    pub name: &'a str,
    /// Where events are POSTed.
    pub url: &'a str,
    /// The event types it receives.
    pub events: &'a [String],
    /// For `*.expiring` events: how many days ahead.
    pub expiring_days: i64,
    /// The receiver's CA bundle ("" for the system's roots).
    pub ca_pem: &'a str,
    /// For `mqtt.message`: the topic filter.
    pub topic_filter: Option<&'a str>,
}

/// A change to a webhook; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct WebhookUpdate {
    /// New URL.
    pub url: Option<String>,
    /// New event types.
    pub events: Option<Vec<String>>,
    /// On or off.
    pub enabled: Option<bool>,
    /// Days ahead for expiring events.
    pub expiring_days: Option<i64>,
    /// New CA bundle (empty string: the system's roots).
    pub ca_pem: Option<String>,
}

fn check_url(url: &str) -> Result<(), RegistryError> {
    let ok = (url.starts_with("https://") || url.starts_with("http://"))
        && url.len() <= 2048
        && url
            .parse::<hyper::Uri>()
            .is_ok_and(|u| u.host().is_some_and(|h| !h.is_empty()));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!(
            "webhook url '{url}' must be an http:// or https:// URL with a host (at most 2048 characters)"
        )))
    }
}

fn check_events(events: &[String]) -> Result<(), RegistryError> {
    if events.is_empty() {
        return Err(RegistryError::Invalid(format!(
            "a webhook needs at least one event; events are {}",
            EVENT_TYPES.join(", ")
        )));
    }
    for e in events {
        if !EVENT_TYPES.contains(&e.as_str()) {
            return Err(RegistryError::Invalid(format!(
                "unknown event '{e}'; events are {}",
                EVENT_TYPES.join(", ")
            )));
        }
    }
    Ok(())
}

fn check_days(days: i64) -> Result<(), RegistryError> {
    if (1..=3650).contains(&days) {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!(
            "expiring_days {days} must be between 1 and 3650"
        )))
    }
}

fn check_ca(ca_pem: &str) -> Result<(), RegistryError> {
    if !ca_pem.is_empty()
        && portcullis_pki::Certificate::all_from_pem_or_der(ca_pem.as_bytes())?.is_empty()
    {
        return Err(RegistryError::Invalid(
            "ca_pem holds no certificate".to_string(),
        ));
    }
    Ok(())
}

fn webhook_from_row<R: Row>(row: &R) -> Result<Webhook, RegistryError>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let events: String = row.try_get("events")?;
    let ca: String = row.try_get("ca_pem")?;
    Ok(Webhook {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        url: row.try_get("url")?,
        events: serde_json::from_str(&events)
            .map_err(|e| RegistryError::Invalid(format!("stored events: {e}")))?,
        expiring_days: row.try_get("expiring_days")?,
        enabled: row.try_get::<i64, _>("enabled")? != 0,
        custom_ca: !ca.is_empty(),
        topic_filter: row.try_get("topic_filter")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        version: row.try_get("version")?,
    })
}

fn delivery_from_row<R: Row>(row: &R) -> Result<Delivery, RegistryError>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let payload: String = row.try_get("payload")?;
    Ok(Delivery {
        id: row.try_get("id")?,
        webhook_id: row.try_get("webhook_id")?,
        event_type: row.try_get("event_type")?,
        status: row.try_get("status")?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        last_error: row.try_get("last_error")?,
        last_status: row.try_get("last_status")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        replay_of: row.try_get("replay_of")?,
        payload: serde_json::from_str(&payload).unwrap_or(Value::String(payload)),
    })
}

impl Store {
    /// Seals the webhook secrets still kept in clear (stored before the store had the cluster
    /// key); how many.
    pub(crate) async fn seal_clear_webhook_secrets(&self) -> Result<u64, RegistryError> {
        let rows: Vec<(String, String)> = with_pool!(self, pool => {
            Ok::<_, RegistryError>(sqlx::query_as("SELECT id, secret FROM webhooks").fetch_all(pool).await?)
        })?;
        let mut sealed = 0;
        for (id, secret) in rows {
            if crate::sealed::is_sealed(&secret) {
                continue;
            }
            let kept = self.keep_secret(&secret, &secret_context(&id))?;
            if kept == secret {
                continue;
            }
            with_pool!(self, pool => {
                sqlx::query("UPDATE webhooks SET secret = $1 WHERE id = $2 AND secret = $3")
                    .bind(&kept)
                    .bind(&id)
                    .bind(&secret)
                    .execute(pool)
                    .await?;
                Ok::<(), RegistryError>(())
            })?;
            sealed += 1;
        }
        Ok(sealed)
    }

    /// Creates a webhook; returns it with its signing secret (shown only now).
    pub async fn create_webhook(
        &self,
        new: &NewWebhook<'_>,
        actor: &str,
    ) -> Result<(Webhook, String), RegistryError> {
        let NewWebhook {
            name,
            url,
            events,
            expiring_days,
            ca_pem,
            topic_filter,
        } = *new;
        check_name("webhook", name)?;
        check_url(url)?;
        check_events(events)?;
        check_days(expiring_days)?;
        let wants_messages = events.iter().any(|e| e == "mqtt.message");
        match (wants_messages, topic_filter) {
            (true, None) => {
                return Err(RegistryError::Invalid(
                    "the mqtt.message event needs a topic filter (--topic-filter devices/+/telemetry)".into(),
                ));
            }
            (false, Some(_)) => {
                return Err(RegistryError::Invalid(
                    "a topic filter only applies to the mqtt.message event".into(),
                ));
            }
            (true, Some(f)) => {
                if f.is_empty() || f.len() > 1024 || f.contains('\0') {
                    return Err(RegistryError::Invalid(format!(
                        "topic filter '{f}' must be 1-1024 characters without NUL"
                    )));
                }
            }
            (false, None) => {}
        }
        check_ca(ca_pem)?;
        let id = format!("wh_{}", random_hex(8)?);
        let secret = format!("whsec_{}", random_hex(32)?);
        let kept = self.keep_secret(&secret, &secret_context(&id))?;
        let events_json = serde_json::to_string(events)
            .map_err(|e| RegistryError::Invalid(format!("events: {e}")))?;
        let now = now();
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let inserted = sqlx::query("INSERT INTO webhooks (id, name, url, secret, events, expiring_days, enabled, ca_pem, after_seq, created_at, updated_at, version, topic_filter) VALUES ($1, $2, $3, $4, $5, $6, 1, $7, (SELECT COALESCE(MAX(seq), 0) FROM events), $8, $8, 1, $9)")
                .bind(&id)
                .bind(name)
                .bind(url)
                .bind(&kept)
                .bind(&events_json)
                .bind(expiring_days)
                .bind(ca_pem)
                .bind(now)
                .bind(topic_filter)
                .execute(&mut *tx)
                .await;
            if let Err(e) = inserted {
                return Err(conflict_or(e, format!("webhook '{name}' exists already")));
            }
            let after = json!({"name": name, "url": url, "events": events}).to_string();
            audit(&mut *tx, actor, AuditAction::WebhookCreate, &id, None, Some(&after)).await?;
            tx.commit().await?;
            Ok::<(), RegistryError>(())
        })?;
        Ok((self.webhook(&id).await?, secret))
    }

    /// A webhook, by id or name.
    /// Where a webhook is called and how it is signed: (URL, secret, CA bundle or ""), for a
    /// synchronous hook; `Invalid` when the webhook is disabled.
    pub async fn webhook_target(
        &self,
        id_or_name: &str,
    ) -> Result<(String, String, String), RegistryError> {
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT id, url, secret, ca_pem, enabled FROM webhooks WHERE id = $1 OR name = $1")
                .bind(id_or_name)
                .fetch_optional(pool)
                .await?
                .ok_or_else(|| RegistryError::NotFound(format!("webhook '{id_or_name}'")))?;
            if row.try_get::<i64, _>("enabled")? == 0 {
                return Err(RegistryError::Invalid(format!("webhook '{id_or_name}' is disabled")));
            }
            let id: String = row.try_get("id")?;
            Ok((
                row.try_get("url")?,
                self.open_secret(row.try_get("secret")?, &secret_context(&id))?,
                row.try_get("ca_pem")?,
            ))
        })
    }

    /// A webhook by id or name.
    pub async fn webhook(&self, id_or_name: &str) -> Result<Webhook, RegistryError> {
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT * FROM webhooks WHERE id = $1 OR name = $1")
                .bind(id_or_name)
                .fetch_optional(pool)
                .await?
                .ok_or_else(|| RegistryError::NotFound(format!("webhook '{id_or_name}'")))?;
            webhook_from_row(&row)
        })
    }

    /// Every webhook, by name.
    pub async fn list_webhooks(&self) -> Result<Vec<Webhook>, RegistryError> {
        with_pool!(self, pool => {
            let rows = sqlx::query("SELECT * FROM webhooks ORDER BY name").fetch_all(pool).await?;
            rows.iter().map(webhook_from_row).collect()
        })
    }

    /// Changes a webhook.
    pub async fn update_webhook(
        &self,
        id_or_name: &str,
        update: &WebhookUpdate,
        actor: &str,
    ) -> Result<Webhook, RegistryError> {
        if let Some(url) = &update.url {
            check_url(url)?;
        }
        if let Some(events) = &update.events {
            check_events(events)?;
        }
        if let Some(days) = update.expiring_days {
            check_days(days)?;
        }
        if let Some(ca) = &update.ca_pem {
            check_ca(ca)?;
        }
        loop {
            let before = self.webhook(id_or_name).await?;
            let url = update.url.clone().unwrap_or(before.url.clone());
            let events = update.events.clone().unwrap_or(before.events.clone());
            let events_json = serde_json::to_string(&events)
                .map_err(|e| RegistryError::Invalid(format!("events: {e}")))?;
            let enabled = update.enabled.unwrap_or(before.enabled);
            let days = update.expiring_days.unwrap_or(before.expiring_days);
            let written = with_pool!(self, pool => {
                let mut tx = pool.begin().await?;
                let done = sqlx::query("UPDATE webhooks SET url = $1, events = $2, enabled = $3, expiring_days = $4, ca_pem = COALESCE($5, ca_pem), updated_at = $6, version = version + 1 WHERE id = $7 AND version = $8")
                    .bind(&url)
                    .bind(&events_json)
                    .bind(i64::from(enabled))
                    .bind(days)
                    .bind(update.ca_pem.as_deref())
                    .bind(now())
                    .bind(&before.id)
                    .bind(before.version)
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() == 1 {
                    let b = json!({"url": before.url, "events": before.events, "enabled": before.enabled, "expiring_days": before.expiring_days}).to_string();
                    let a = json!({"url": url, "events": events, "enabled": enabled, "expiring_days": days}).to_string();
                    audit(&mut *tx, actor, AuditAction::WebhookUpdate, &before.id, Some(&b), Some(&a)).await?;
                    tx.commit().await?;
                    true
                } else {
                    false
                }
            });
            if written {
                return self.webhook(&before.id).await;
            }
        }
    }

    /// Deletes a webhook and its deliveries.
    pub async fn delete_webhook(&self, id_or_name: &str, actor: &str) -> Result<(), RegistryError> {
        let before = self.webhook(id_or_name).await?;
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query("DELETE FROM webhook_deliveries WHERE webhook_id = $1").bind(&before.id).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM expiry_notices WHERE webhook_id = $1").bind(&before.id).execute(&mut *tx).await?;
            let done = sqlx::query("DELETE FROM webhooks WHERE id = $1").bind(&before.id).execute(&mut *tx).await?;
            if done.rows_affected() != 1 {
                return Err(RegistryError::NotFound(format!("webhook '{id_or_name}'")));
            }
            let b = json!({"name": before.name, "url": before.url}).to_string();
            audit(&mut *tx, actor, AuditAction::WebhookDelete, &before.id, Some(&b), None).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Events recorded after `seq`, oldest first, at most `limit`: (seq, type, payload JSON).
    /// Every gateway node reads them to publish on its MQTT `$portcullis/events/…` topics.
    pub async fn events_after(
        &self,
        seq: i64,
        limit: i64,
    ) -> Result<Vec<(i64, String, String)>, RegistryError> {
        with_pool!(self, pool => {
            let rows = sqlx::query("SELECT seq, type, payload FROM events WHERE seq > $1 ORDER BY seq LIMIT $2")
                .bind(seq)
                .bind(limit)
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|r| Ok((r.try_get("seq")?, r.try_get("type")?, r.try_get("payload")?)))
                .collect()
        })
    }

    /// The newest event's sequence number (0 when none).
    pub async fn newest_event(&self) -> Result<i64, RegistryError> {
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS seq FROM events").fetch_one(pool).await?;
            Ok(row.try_get::<i64, _>("seq")?)
        })
    }

    /// The forwarding rules: (webhook id, topic filter) of every enabled webhook subscribed to
    /// `mqtt.message`.
    pub async fn message_rules(&self) -> Result<Vec<(String, String)>, RegistryError> {
        Ok(self
            .list_webhooks()
            .await?
            .into_iter()
            .filter(|w| w.enabled && w.events.iter().any(|e| e == "mqtt.message"))
            .filter_map(|w| Some((w.id, w.topic_filter?)))
            .collect())
    }

    /// Queues MQTT messages for their forwarding rules: (webhook id, envelope JSON).
    pub async fn enqueue_message_deliveries(
        &self,
        deliveries: &[(String, String)],
    ) -> Result<(), RegistryError> {
        let now = now();
        // Rules deleted since the gateway's snapshot are skipped (their rows would break the
        // foreign key and the whole batch).
        let live: std::collections::HashSet<String> = self
            .message_rules()
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let deliveries: Vec<&(String, String)> = deliveries
            .iter()
            .filter(|(id, _)| live.contains(id))
            .collect();
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            for chunk in deliveries.chunks(200) {
                let mut sql = String::from("INSERT INTO webhook_deliveries (id, webhook_id, event_type, payload, status, attempts, next_attempt_at, lease_until, created_at, updated_at) VALUES ");
                for i in 0..chunk.len() {
                    if i > 0 {
                        sql.push_str(", ");
                    }
                    let b = 3 * i;
                    sql.push_str(&format!("(${}, ${}, 'mqtt.message', ${}, 'pending', 0, $1, 0, $1, $1)", b + 2, b + 3, b + 4));
                }
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now);
                for &(webhook, payload) in chunk {
                    query = query
                        .bind(format!("dl_{}", random_hex(10)?))
                        .bind(webhook.clone())
                        .bind(payload.clone());
                }
                query.execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Fans pending events out to the enabled webhooks that subscribe to them, up to `limit`
    /// events; returns how many deliveries were made. Each event is claimed in its own
    /// transaction, so two nodes never fan one out twice.
    pub async fn fan_out_events(&self, limit: i64) -> Result<usize, RegistryError> {
        // The events first, then the subscriptions: a webhook created after this read starts
        // after these events (its `after_seq`), and one created before it is seen below.
        let pending: Vec<(i64, String, String)> = with_pool!(self, pool => {
            sqlx::query("SELECT seq, type, payload FROM events WHERE dispatched = 0 ORDER BY seq LIMIT $1")
                .bind(limit)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| Ok((r.try_get("seq")?, r.try_get("type")?, r.try_get("payload")?)))
                .collect::<Result<_, RegistryError>>()
        })?;
        if pending.is_empty() {
            return Ok(0);
        }
        let hooks = self.list_webhooks().await?;
        let after: std::collections::HashMap<String, i64> = with_pool!(self, pool => {
            sqlx::query("SELECT id, after_seq FROM webhooks")
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| Ok((r.try_get("id")?, r.try_get("after_seq")?)))
                .collect::<Result<_, RegistryError>>()
        })?;
        let subscribers = |seq: i64, kind: &str| {
            hooks
                .iter()
                .filter(|h| {
                    h.enabled
                        && h.events.iter().any(|e| e == kind)
                        && after.get(&h.id).is_some_and(|a| seq > *a)
                })
                .collect::<Vec<_>>()
        };
        // Events no webhook subscribes to (all of them when there is none, the usual case) are
        // marked in one statement per hundred: a million registrations are not a million
        // transactions for nothing.
        let (wanted, unwanted): (Vec<_>, Vec<_>) = pending
            .iter()
            .partition(|(seq, kind, _)| !subscribers(*seq, kind).is_empty());
        let mut made = 0;
        with_pool!(self, pool => {
            for chunk in unwanted.chunks(100) {
                let marks: Vec<String> = (1..=chunk.len()).map(|n| format!("${n}")).collect();
                let sql = format!(
                    "UPDATE events SET dispatched = 1 WHERE dispatched = 0 AND seq IN ({})",
                    marks.join(", ")
                );
                // Only numbered placeholders are formatted in; the values are bound.
                let mut update = sqlx::query(sqlx::AssertSqlSafe(sql));
                for (seq, _, _) in chunk {
                    update = update.bind(*seq);
                }
                update.execute(pool).await?;
            }
            for (seq, kind, payload) in wanted {
                let mut tx = pool.begin().await?;
                let claimed = sqlx::query("UPDATE events SET dispatched = 1 WHERE seq = $1 AND dispatched = 0")
                    .bind(*seq)
                    .execute(&mut *tx)
                    .await?;
                if claimed.rows_affected() != 1 {
                    continue;
                }
                let now = now();
                for hook in subscribers(*seq, kind) {
                    sqlx::query("INSERT INTO webhook_deliveries (id, webhook_id, event_type, payload, status, attempts, next_attempt_at, lease_until, created_at, updated_at) VALUES ($1, $2, $3, $4, 'pending', 0, $5, 0, $5, $5)")
                        .bind(format!("dl_{}", random_hex(10)?))
                        .bind(&hook.id)
                        .bind(kind)
                        .bind(payload)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    made += 1;
                }
                tx.commit().await?;
            }
            Ok::<(), RegistryError>(())
        })?;
        Ok(made)
    }

    /// Deletes fanned-out events older than a week (kept that long for inspection). The
    /// dispatcher calls it now and then, not every round: it reads every dispatched event.
    pub async fn prune_events(&self) -> Result<(), RegistryError> {
        with_pool!(self, pool => {
            sqlx::query("DELETE FROM events WHERE dispatched = 1 AND at < $1")
                .bind(now() - 7 * 86_400)
                .execute(pool)
                .await?;
            Ok::<(), RegistryError>(())
        })
    }

    /// Claims up to `limit` due deliveries for this node (a lease of two minutes).
    pub async fn claim_due_deliveries(
        &self,
        limit: i64,
    ) -> Result<Vec<DueDelivery>, RegistryError> {
        let now = now();
        with_pool!(self, pool => {
            let rows = sqlx::query("SELECT d.id, d.event_type, d.payload, d.attempts, w.id AS webhook_id, w.url, w.secret, w.ca_pem FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id WHERE d.status = 'pending' AND d.next_attempt_at <= $1 AND d.lease_until < $1 AND w.enabled = 1 ORDER BY d.next_attempt_at LIMIT $2")
                .bind(now)
                .bind(limit)
                .fetch_all(pool)
                .await?;
            let mut claimed = Vec::new();
            for row in &rows {
                let id: String = row.try_get("id")?;
                let done = sqlx::query("UPDATE webhook_deliveries SET lease_until = $1 WHERE id = $2 AND status = 'pending' AND lease_until < $3")
                    .bind(now + LEASE_SECONDS)
                    .bind(&id)
                    .bind(now)
                    .execute(pool)
                    .await?;
                if done.rows_affected() == 1 {
                    claimed.push(DueDelivery {
                        id,
                        event_type: row.try_get("event_type")?,
                        payload: row.try_get("payload")?,
                        attempts: row.try_get("attempts")?,
                        url: row.try_get("url")?,
                        secret: self.open_secret(
                            row.try_get("secret")?,
                            &secret_context(&row.try_get::<String, _>("webhook_id")?),
                        )?,
                        ca_pem: row.try_get("ca_pem")?,
                    });
                }
            }
            Ok(claimed)
        })
    }

    /// Records an attempt: delivered, or failed with the reason (retried with backoff until
    /// [`MAX_ATTEMPTS`]).
    pub async fn record_delivery_attempt(
        &self,
        id: &str,
        outcome: Result<u16, (Option<u16>, String)>,
    ) -> Result<(), RegistryError> {
        let now = now();
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT attempts FROM webhook_deliveries WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?
                .ok_or_else(|| RegistryError::NotFound(format!("delivery {id}")))?;
            let attempts: i64 = row.try_get::<i64, _>("attempts")? + 1;
            let (status, next, error, code) = match &outcome {
                Ok(code) => ("delivered", now, None, Some(i64::from(*code))),
                Err((code, why)) => {
                    let wait = BACKOFF
                        .get(usize::try_from(attempts - 1).unwrap_or(usize::MAX))
                        .or(BACKOFF.last())
                        .copied()
                        .unwrap_or(3600);
                    let status = if attempts >= MAX_ATTEMPTS { "failed" } else { "pending" };
                    (status, now + wait, Some(why.clone()), code.map(i64::from))
                }
            };
            sqlx::query("UPDATE webhook_deliveries SET status = $1, attempts = $2, next_attempt_at = $3, last_error = $4, last_status = $5, lease_until = 0, updated_at = $6 WHERE id = $7")
                .bind(status)
                .bind(attempts)
                .bind(next)
                .bind(error)
                .bind(code)
                .bind(now)
                .bind(id)
                .execute(pool)
                .await?;
            Ok(())
        })
    }

    /// A webhook's deliveries, newest first, optionally of one status.
    pub async fn deliveries(
        &self,
        webhook: &str,
        status: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Delivery>, RegistryError> {
        let hook = self.webhook(webhook).await?;
        if let Some(s) = status
            && !matches!(s, "pending" | "delivered" | "failed")
        {
            return Err(RegistryError::Invalid(format!(
                "status '{s}' must be pending, delivered or failed"
            )));
        }
        with_pool!(self, pool => {
            let rows = sqlx::query("SELECT * FROM webhook_deliveries WHERE webhook_id = $1 AND ($2 IS NULL OR status = $2) ORDER BY created_at DESC, id LIMIT $3")
                .bind(&hook.id)
                .bind(status)
                .bind(limit.clamp(1, 1000))
                .fetch_all(pool)
                .await?;
            rows.iter().map(delivery_from_row).collect()
        })
    }

    /// One delivery.
    pub async fn delivery(&self, id: &str) -> Result<Delivery, RegistryError> {
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT * FROM webhook_deliveries WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?
                .ok_or_else(|| RegistryError::NotFound(format!("delivery {id}")))?;
            delivery_from_row(&row)
        })
    }

    /// Sends a delivery's event again, as a new delivery.
    pub async fn replay_delivery(&self, id: &str, actor: &str) -> Result<Delivery, RegistryError> {
        let original = self.delivery(id).await?;
        let new_id = format!("dl_{}", random_hex(10)?);
        let now = now();
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query("INSERT INTO webhook_deliveries (id, webhook_id, event_type, payload, status, attempts, next_attempt_at, lease_until, created_at, updated_at, replay_of) SELECT $1, webhook_id, event_type, payload, 'pending', 0, $2, 0, $2, $2, id FROM webhook_deliveries WHERE id = $3")
                .bind(&new_id)
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            audit(&mut *tx, actor, AuditAction::WebhookReplay, &original.webhook_id, Some(id), Some(&new_id)).await?;
            tx.commit().await?;
            Ok::<(), RegistryError>(())
        })?;
        self.delivery(&new_id).await
    }

    /// Makes deliveries for certificates and CAs that expire within each subscribed webhook's
    /// `expiring_days` and that it was not told about yet; returns how many were made.
    pub async fn check_expiring(&self) -> Result<usize, RegistryError> {
        let now = now();
        let mut made = 0;
        for hook in self
            .list_webhooks()
            .await?
            .into_iter()
            .filter(|h| h.enabled)
        {
            for (kind, table, event) in [
                ("certificate", "certificates", "certificate.expiring"),
                ("ca", "cas", "ca.expiring"),
            ] {
                if !hook.events.iter().any(|e| e == event) {
                    continue;
                }
                let horizon = now + hook.expiring_days * 86_400;
                with_pool!(self, pool => {
                    let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT id, subject, not_after, status FROM {table} WHERE not_after > $1 AND not_after <= $2 AND status <> 'REVOKED' AND id NOT IN (SELECT target FROM expiry_notices WHERE webhook_id = $3 AND kind = $4) ORDER BY not_after LIMIT 10000")))
                        .bind(now)
                        .bind(horizon)
                        .bind(&hook.id)
                        .bind(kind)
                        .fetch_all(pool)
                        .await?;
                    for row in &rows {
                        let id: String = row.try_get("id")?;
                        let not_after: i64 = row.try_get("not_after")?;
                        let payload = json!({
                            "event": event,
                            "occurred_at": now,
                            "actor": "system:expiry-check",
                            "target": id,
                            "before": Value::Null,
                            "after": {"id": id, "subject": row.try_get::<String, _>("subject")?, "status": row.try_get::<String, _>("status")?,
                                      "not_after": not_after, "days_left": (not_after - now) / 86_400},
                        })
                        .to_string();
                        let mut tx = pool.begin().await?;
                        let noted = sqlx::query("INSERT INTO expiry_notices (webhook_id, kind, target, at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
                            .bind(&hook.id)
                            .bind(kind)
                            .bind(&id)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                        if noted.rows_affected() == 1 {
                            sqlx::query("INSERT INTO webhook_deliveries (id, webhook_id, event_type, payload, status, attempts, next_attempt_at, lease_until, created_at, updated_at) VALUES ($1, $2, $3, $4, 'pending', 0, $5, 0, $5, $5)")
                                .bind(format!("dl_{}", random_hex(10)?))
                                .bind(&hook.id)
                                .bind(event)
                                .bind(&payload)
                                .bind(now)
                                .execute(&mut *tx)
                                .await?;
                            made += 1;
                        }
                        tx.commit().await?;
                    }
                    Ok::<(), RegistryError>(())
                })?;
            }
        }
        Ok(made)
    }
}

/// The record a webhook's sealed secret is bound to.
fn secret_context(id: &str) -> String {
    format!("webhook-secret:{id}")
}
