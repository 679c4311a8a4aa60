-- Fleet provisioning by claim (IoT Core's CreateKeysAndCertificate, CreateCertificateFromCsr
-- and RegisterThing). A claim certificate may only ask for its device's own certificate, under
-- the templates it names (a JSON array; NULL: not a claim).
ALTER TABLE certificates ADD COLUMN claim_templates TEXT;

-- Templates by name: the document (JSON), whether devices may use it now.
CREATE TABLE fleet_templates (
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    enabled INTEGER NOT NULL,
    document TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    version INTEGER NOT NULL
);

-- Certificate ownership tokens, single use, an hour each, kept as SHA-256 hashes. A certificate
-- made for a device waits PENDING_ACTIVATION until RegisterThing spends its token; one whose
-- token expired unspent is deleted (nothing half-provisioned stays).
CREATE TABLE ownership_tokens (
    token_hash TEXT PRIMARY KEY,
    certificate_id TEXT NOT NULL REFERENCES certificates (id) ON DELETE CASCADE,
    claim_id TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX ownership_tokens_by_expiry ON ownership_tokens (expires_at);
