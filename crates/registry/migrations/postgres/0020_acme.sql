-- ACME (RFC 8555) for server certificates: the cluster's account per directory (its
-- credentials sealed under the cluster key), the challenge answers every node serves while an
-- order is validated, and leases, so that one node at a time orders for the cluster.
CREATE TABLE acme_accounts (
    directory TEXT PRIMARY KEY,
    sealed_credentials TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE acme_challenges (
    token TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    kind TEXT NOT NULL,
    key_authorization TEXT NOT NULL,
    expires_ms BIGINT NOT NULL
);

CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_ms BIGINT NOT NULL
);
