-- Policies: named documents with numbered versions (at most five kept, one the default), attached
-- to certificates, things, CAs (inherited by the certificates they issued) and domains.

CREATE TABLE policies (
    name TEXT PRIMARY KEY,
    default_version BIGINT NOT NULL,
    -- The highest version number ever used: numbers are never reused.
    latest_version BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    version BIGINT NOT NULL
);

CREATE TABLE policy_versions (
    policy TEXT NOT NULL REFERENCES policies (name) ON DELETE CASCADE,
    version BIGINT NOT NULL,
    document TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (policy, version)
);

CREATE TABLE policy_attachments (
    policy TEXT NOT NULL REFERENCES policies (name) ON DELETE CASCADE,
    -- certificate | thing | ca | domain
    target_type TEXT NOT NULL,
    target TEXT NOT NULL,
    attached_at BIGINT NOT NULL,
    PRIMARY KEY (policy, target_type, target)
);

CREATE INDEX policy_attachments_by_target ON policy_attachments (target_type, target);
