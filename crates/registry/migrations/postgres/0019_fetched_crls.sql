-- CRLs fetched from other CAs' distribution points, shared by every node: the last good CRL
-- of each URL (with the CA certificate it was verified against) and the last failure.
CREATE TABLE fetched_crls (
    url TEXT PRIMARY KEY,
    issuer_der BYTEA NOT NULL,
    crl_der BYTEA,
    fetched_at BIGINT,
    next_update BIGINT,
    error TEXT,
    failed_at BIGINT
);
