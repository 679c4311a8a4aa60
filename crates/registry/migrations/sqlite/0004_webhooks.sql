-- Webhooks: events written in the same transaction as the change that caused them (an
-- outbox), subscriptions, and deliveries with their attempts.

CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL,
    at INTEGER NOT NULL,
    payload TEXT NOT NULL,
    -- Set once the event has been fanned out to the subscriptions of the moment.
    dispatched INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX events_pending ON events (dispatched, seq);

CREATE TABLE webhooks (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    -- JSON list of event types.
    events TEXT NOT NULL,
    expiring_days INTEGER NOT NULL,
    enabled INTEGER NOT NULL,
    -- PEM bundle the receiver's certificate must chain to (empty: the system's roots).
    ca_pem TEXT NOT NULL,
    -- Events up to this sequence number happened before the subscription: not for it.
    after_seq INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    version INTEGER NOT NULL
);

CREATE TABLE webhook_deliveries (
    id TEXT PRIMARY KEY,
    webhook_id TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_type TEXT NOT NULL,
    payload TEXT NOT NULL,
    -- pending | delivered | failed
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    lease_until INTEGER NOT NULL,
    last_error TEXT,
    last_status INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    -- The delivery this one replays, if any.
    replay_of TEXT
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);
CREATE INDEX webhook_deliveries_by_webhook ON webhook_deliveries (webhook_id, created_at);

-- Which expiring certificates and CAs a webhook has been told about (once per item).
CREATE TABLE expiry_notices (
    webhook_id TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (webhook_id, kind, target)
);
