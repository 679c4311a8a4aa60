-- The control plane: admin tokens (stored hashed), things and their certificates, versioned
-- truststores, and domains managed through the admin API.

CREATE TABLE admin_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    last_used INTEGER
);

CREATE TABLE things (
    name TEXT PRIMARY KEY,
    attributes TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    version INTEGER NOT NULL
);

CREATE TABLE thing_certificates (
    thing_name TEXT NOT NULL REFERENCES things (name) ON DELETE CASCADE,
    certificate_id TEXT NOT NULL REFERENCES certificates (id) ON DELETE CASCADE,
    exclusive INTEGER NOT NULL,
    attached_at INTEGER NOT NULL,
    PRIMARY KEY (thing_name, certificate_id)
);

CREATE INDEX thing_certificates_by_certificate ON thing_certificates (certificate_id);

CREATE TABLE truststore_versions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    bundle TEXT NOT NULL,
    crls TEXT NOT NULL,
    warnings TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (name, version)
);

CREATE TABLE domains (
    hostname TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    version INTEGER NOT NULL
);

CREATE INDEX certificates_by_last_seen ON certificates (last_seen);
CREATE INDEX audit_by_action ON audit (action);

-- Every client certificate a gateway has seen, registered or not: what a truststore change
-- would affect (impact preview).
CREATE TABLE sightings (
    certificate_id TEXT PRIMARY KEY,
    der BLOB NOT NULL,
    subject TEXT NOT NULL,
    domain TEXT NOT NULL,
    last_seen INTEGER NOT NULL
);

CREATE INDEX sightings_by_last_seen ON sightings (last_seen);
