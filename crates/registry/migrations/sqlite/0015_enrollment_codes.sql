-- One-time enrollment codes (EST simpleenroll with HTTP Basic authentication, for devices with
-- no certificate yet): each good once, for one provisioning template, until it expires; kept
-- as SHA-256 hashes.
CREATE TABLE enrollment_codes (
    code_hash TEXT PRIMARY KEY,
    template TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
