-- SCEP transactions (RFC 8894): the certificate issued for a client's transaction, so that a
-- client that sends its request again or polls (CertPoll) gets the same certificate back on any
-- node, and only the key that asked. Forgotten after 7 days.
CREATE TABLE scep_transactions (
    transaction_id TEXT NOT NULL,
    signer_key_sha256 TEXT NOT NULL,
    certificate_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (transaction_id, signer_key_sha256)
);
