-- When each change was committed, in milliseconds: nodes measure how long a change took to be
-- enforced on them (portcullis_registry_change_enforce_seconds).
ALTER TABLE audit ADD COLUMN at_ms INTEGER;

-- The nodes of a cluster, each writing its heartbeat every few seconds: what
-- `portcullis cluster status` and GET /v1/cluster show.
CREATE TABLE cluster_nodes (
    id TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    heartbeat_ms INTEGER NOT NULL,
    snapshot_marker INTEGER NOT NULL,
    snapshot_ms INTEGER NOT NULL,
    connections INTEGER NOT NULL,
    mqtt_sessions INTEGER NOT NULL
);
