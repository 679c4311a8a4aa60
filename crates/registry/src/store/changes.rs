//! The audit log as the change feed: every change appends its audit entry (and webhook event)
//! in its own transaction; nodes read changes since a sequence number, and PostgreSQL
//! notifications wake them.

use sqlx::Row;

use super::{Pool, Store, now, webhooks, with_pool};
use crate::RegistryError;
use crate::audit::AuditAction;

/// What a [`ChangeListener`] heard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Certificates, CAs, things, policies… changed, recorded from this audit sequence number
    /// on: refresh the snapshot, reading the changes again from there.
    Registry(Option<i64>),
    /// Domains or truststores changed: rebuild the configuration (and the snapshot).
    Config(Option<i64>),
    /// The connection was lost and is back: notifications may have been missed, so resync
    /// everything.
    Resync,
}

/// One change read back from the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEntry {
    /// Its audit sequence number.
    pub seq: i64,
    /// The action's stored name ([`AuditAction::parse`]).
    pub action: String,
    /// What it changed (a certificate id, a name…).
    pub target: String,
    /// When it was committed, in milliseconds since the epoch (absent on entries written
    /// before this was recorded).
    pub at_ms: Option<i64>,
}

/// Milliseconds since the epoch (the audit log's `at_ms`, heartbeats).
pub fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default(),
    )
    .unwrap_or(i64::MAX)
}

/// Notifications of committed changes (PostgreSQL).
#[derive(Debug)]
pub struct ChangeListener {
    listener: sqlx::postgres::PgListener,
}

impl ChangeListener {
    /// The next change. A lost connection is reconnected here and reported as
    /// [`Change::Resync`]; an error means the database cannot be reached right now.
    pub async fn next(&mut self) -> Result<Change, RegistryError> {
        match self.listener.try_recv().await? {
            None => Ok(Change::Resync),
            Some(n) => {
                let (class, seq) = n.payload().split_once(':').unwrap_or((n.payload(), ""));
                let seq = seq.parse().ok();
                Ok(if class == "config" {
                    Change::Config(seq)
                } else {
                    Change::Registry(seq)
                })
            }
        }
    }
}

/// Appends an audit entry, and the webhook event the change amounts to (if any), in the
/// caller's transaction: both commit with the change or not at all.
pub(crate) async fn audit<C, DB>(
    conn: &mut C,
    actor: &str,
    action: AuditAction,
    target: &str,
    before: Option<&str>,
    after: Option<&str>,
) -> Result<(), sqlx::Error>
where
    DB: sqlx::Database,
    C: Send,
    for<'c> &'c mut C: sqlx::Executor<'c, Database = DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
{
    let at = now();
    sqlx::query("INSERT INTO audit (at, actor, action, target, before, after, at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)")
        .bind(at)
        .bind(actor)
        .bind(action.as_str())
        .bind(target)
        .bind(before)
        .bind(after)
        .bind(now_ms())
        .execute(&mut *conn)
        .await?;
    // Every node LISTENs: the notification is delivered at commit, in commit order, so a node
    // refreshes even when a change with a smaller sequence number commits after a larger one.
    if DB::NAME == "PostgreSQL" {
        let class = if action.effects().configuration {
            "config"
        } else {
            "registry"
        };
        // The payload carries the entry's sequence number: a node that already moved past it
        // (a larger one committed first) reads the changes again from there.
        sqlx::query("SELECT pg_notify('portcullis_changes', $1 || ':' || currval(pg_get_serial_sequence('audit', 'seq')))")
            .bind(class)
            .execute(&mut *conn)
            .await?;
    }
    if let Some(event) = webhooks::event_of(action, before, after) {
        let payload = webhooks::event_payload(event, at, actor, target, before, after);
        sqlx::query("INSERT INTO events (type, at, payload, dispatched) VALUES ($1, $2, $3, 0)")
            .bind(event)
            .bind(at)
            .bind(payload)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// [`audit`] for many entries of one action (target, before, after), in multi-row statements
/// of at most 500 entries (parameter limits).
pub(crate) async fn audit_many<C, DB>(
    conn: &mut C,
    actor: &str,
    action: AuditAction,
    entries: &[(String, Option<String>, String)],
) -> Result<(), sqlx::Error>
where
    DB: sqlx::Database,
    C: Send,
    for<'c> &'c mut C: sqlx::Executor<'c, Database = DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<String>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
{
    if entries.is_empty() {
        return Ok(());
    }
    if DB::NAME == "PostgreSQL" {
        // A number below every entry these statements insert (see `audit`).
        sqlx::query("SELECT pg_notify('portcullis_changes', 'registry:' || nextval(pg_get_serial_sequence('audit', 'seq')))")
            .execute(&mut *conn)
            .await?;
    }
    let at = now();
    for chunk in entries.chunks(500) {
        let mut sql = String::from(
            "INSERT INTO audit (at, actor, action, at_ms, target, before, after) VALUES ",
        );
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!(
                "($1, $2, $3, $4, ${}, ${}, ${})",
                5 + 3 * i,
                6 + 3 * i,
                7 + 3 * i
            ));
        }
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(at)
            .bind(actor)
            .bind(action.as_str())
            .bind(now_ms());
        for (target, before, after) in chunk {
            query = query
                .bind(target.clone())
                .bind(before.clone())
                .bind(after.clone());
        }
        query.execute(&mut *conn).await?;
        let events: Vec<(&str, String)> = chunk
            .iter()
            .filter_map(|(target, before, after)| {
                let event = webhooks::event_of(action, before.as_deref(), Some(after))?;
                Some((
                    event,
                    webhooks::event_payload(
                        event,
                        at,
                        actor,
                        target,
                        before.as_deref(),
                        Some(after),
                    ),
                ))
            })
            .collect();
        if !events.is_empty() {
            let mut sql =
                String::from("INSERT INTO events (type, at, payload, dispatched) VALUES ");
            for i in 0..events.len() {
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!("(${}, $1, ${}, 0)", 2 + 2 * i, 3 + 2 * i));
            }
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(at);
            for (event, payload) in events {
                query = query.bind(event.to_string()).bind(payload);
            }
            query.execute(&mut *conn).await?;
        }
    }
    Ok(())
}

impl Store {
    /// Listens for changes committed by any process on the same database (PostgreSQL
    /// LISTEN/NOTIFY); `None` on SQLite, where one process owns the file and polling suffices.
    pub async fn listen(&self) -> Result<Option<ChangeListener>, RegistryError> {
        match &self.pool {
            Pool::Sqlite(_) => Ok(None),
            Pool::Postgres(pool) => {
                let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
                listener.listen("portcullis_changes").await?;
                Ok(Some(ChangeListener { listener }))
            }
        }
    }

    /// What changed after audit entry `seq`, or was recorded at or after `since` (seconds; a
    /// window for PostgreSQL, where a smaller sequence number can commit later): (seq, action,
    /// target), oldest first, at most `limit`.
    pub async fn changes_since(
        &self,
        seq: i64,
        since: i64,
        limit: i64,
    ) -> Result<Vec<ChangeEntry>, RegistryError> {
        // Two queries, each on its own index (an OR of both makes SQLite scan the table).
        with_pool!(self, pool => {
            let mut rows = sqlx::query("SELECT seq, action, target, at_ms FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2")
                .bind(seq)
                .bind(limit)
                .fetch_all(pool)
                .await?;
            rows.extend(
                // `seq + 0` and no ORDER BY: otherwise SQLite walks the table by seq instead of
                // using the index on `at`.
                sqlx::query("SELECT seq, action, target, at_ms FROM audit WHERE at >= $1 AND seq + 0 <= $2 LIMIT $3")
                    .bind(since)
                    .bind(seq)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?,
            );
            let mut out: Vec<ChangeEntry> = rows
                .iter()
                .map(|r| {
                    Ok(ChangeEntry {
                        seq: r.try_get("seq")?,
                        action: r.try_get("action")?,
                        target: r.try_get("target")?,
                        at_ms: r.try_get("at_ms")?,
                    })
                })
                .collect::<Result<_, RegistryError>>()?;
            out.sort_by_key(|c| c.seq);
            out.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
            Ok(out)
        })
    }

    /// A number that changes whenever the registry changes (every change writes an audit
    /// entry): polled to refresh snapshots, also from other processes.
    pub async fn change_marker(&self) -> Result<i64, RegistryError> {
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS marker FROM audit").fetch_one(pool).await?;
            Ok(row.try_get::<i64, _>("marker")?)
        })
    }
}
