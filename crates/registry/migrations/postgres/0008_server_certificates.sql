-- Server certificates kept in the registry, so that every node serves the same one with no file
-- copied: the chain in PEM, the private key sealed under the cluster key (AES-256-GCM; the key is
-- never in the database).
CREATE TABLE server_certificates (
    name TEXT PRIMARY KEY,
    chain_pem TEXT NOT NULL,
    sealed_key TEXT NOT NULL,
    subject TEXT NOT NULL,
    not_after BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    version BIGINT NOT NULL
);

-- CAs every node of a cluster shares (the local CA that issues `auto` certificates and the admin
-- listener's certificate): the certificate in PEM, the key sealed under the cluster key.
CREATE TABLE cluster_cas (
    name TEXT PRIMARY KEY,
    cert_pem TEXT NOT NULL,
    sealed_key TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
