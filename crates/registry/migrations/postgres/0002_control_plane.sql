-- The control plane: admin tokens (stored hashed), things and their certificates, versioned
-- truststores, and domains managed through the admin API.

CREATE TABLE admin_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    last_used BIGINT
);

CREATE TABLE things (
    name TEXT PRIMARY KEY,
    attributes TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    version BIGINT NOT NULL
);

CREATE TABLE thing_certificates (
    thing_name TEXT NOT NULL REFERENCES things (name) ON DELETE CASCADE,
    certificate_id TEXT NOT NULL REFERENCES certificates (id) ON DELETE CASCADE,
    exclusive BIGINT NOT NULL,
    attached_at BIGINT NOT NULL,
    PRIMARY KEY (thing_name, certificate_id)
);

CREATE INDEX thing_certificates_by_certificate ON thing_certificates (certificate_id);

CREATE TABLE truststore_versions (
    name TEXT NOT NULL,
    version BIGINT NOT NULL,
    bundle TEXT NOT NULL,
    crls TEXT NOT NULL,
    warnings TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (name, version)
);

CREATE TABLE domains (
    hostname TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    version BIGINT NOT NULL
);

CREATE INDEX certificates_by_last_seen ON certificates (last_seen);
CREATE INDEX audit_by_action ON audit (action);

-- Every client certificate a gateway has seen, registered or not: what a truststore change
-- would affect (impact preview).
CREATE TABLE sightings (
    certificate_id TEXT PRIMARY KEY,
    der BYTEA NOT NULL,
    subject TEXT NOT NULL,
    domain TEXT NOT NULL,
    last_seen BIGINT NOT NULL
);

CREATE INDEX sightings_by_last_seen ON sightings (last_seen);
