-- When each change was committed, in milliseconds: nodes measure how long a change took to be
-- enforced on them (portcullis_registry_change_enforce_seconds).
ALTER TABLE audit ADD COLUMN at_ms BIGINT;

-- The nodes of a cluster, each writing its heartbeat every few seconds: what
-- `portcullis cluster status` and GET /v1/cluster show.
CREATE TABLE cluster_nodes (
    id TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    heartbeat_ms BIGINT NOT NULL,
    snapshot_marker BIGINT NOT NULL,
    snapshot_ms BIGINT NOT NULL,
    connections BIGINT NOT NULL,
    mqtt_sessions BIGINT NOT NULL
);
