-- Snapshots follow the registry incrementally: the changes after a sequence number, or recorded
-- within a recent time window (PostgreSQL can commit a smaller sequence number later).
CREATE INDEX audit_by_at ON audit (at);
