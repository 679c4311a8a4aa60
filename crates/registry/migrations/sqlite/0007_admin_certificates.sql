-- Admin client certificates the registry knows: issued by a rotation (ACTIVE) or revoked (a
-- rotated-out or leaked one). A certificate signed by a node's admin CA authenticates unless it
-- is REVOKED here.
CREATE TABLE admin_certificates (
    id TEXT PRIMARY KEY,
    subject TEXT NOT NULL,
    not_after INTEGER NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
