-- The registry's first schema. Times are seconds since the epoch; flags are 0/1 integers so that
-- both backends read them the same way; every mutable row carries a version for optimistic
-- concurrency.

CREATE TABLE registry_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE cas (
    id TEXT PRIMARY KEY,
    der BLOB NOT NULL,
    subject TEXT NOT NULL,
    status TEXT NOT NULL,
    auto_registration INTEGER NOT NULL,
    verified INTEGER NOT NULL,
    provisioning_template TEXT,
    not_after INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    version INTEGER NOT NULL
);

CREATE TABLE certificates (
    id TEXT PRIMARY KEY,
    der BLOB NOT NULL,
    subject TEXT NOT NULL,
    issuer TEXT NOT NULL,
    serial TEXT NOT NULL,
    ca_id TEXT REFERENCES cas (id),
    status TEXT NOT NULL,
    not_after INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    last_seen INTEGER,
    version INTEGER NOT NULL
);

CREATE INDEX certificates_by_status ON certificates (status);
CREATE INDEX certificates_by_ca ON certificates (ca_id);
CREATE INDEX certificates_by_not_after ON certificates (not_after);

CREATE TABLE audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    before TEXT,
    after TEXT
);
