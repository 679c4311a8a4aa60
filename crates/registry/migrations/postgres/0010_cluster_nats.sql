-- Each node's connection to NATS as its heartbeat says it ("connected to NAME",
-- "disconnected", "setting up JetStream"); NULL for a node without NATS.
ALTER TABLE cluster_nodes ADD COLUMN nats TEXT;
