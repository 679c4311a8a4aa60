-- Forwarding rules: a webhook subscribed to `mqtt.message` receives the MQTT messages whose
-- topic matches its filter.
ALTER TABLE webhooks ADD COLUMN topic_filter TEXT;
