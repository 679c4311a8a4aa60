# AWS's own device SDK (awsiotsdk on awscrt, PyPI) against the gateway, under a policy copied
# from AWS IoT Core: MQTT 3.1.1 connect, subscribe, QoS 0 and 1, retained messages and a
# persistent session; the SDK's port-443 ALPN (x-amzn-mqtt-ca) on the HTTP-and-MQTT listener;
# MQTT 5 with the reason codes (and reason strings) of a denied publish and subscription.
# Arguments: MQTT-only port, HTTP-and-MQTT port. Exits non-zero on the first failure.
import queue, sys

from awscrt import io, mqtt, mqtt5
from awsiot import mqtt5_client_builder, mqtt_connection_builder

mqtt_port, both_port = int(sys.argv[1]), int(sys.argv[2])
WAIT = 20
CA = "data/ca/ca.pem"


def check(cond, what):
    if not cond:
        print("FAILED: " + what, flush=True)
        sys.exit(1)
    print("ok " + what, flush=True)


def take(q, what):
    try:
        return q.get(timeout=WAIT)
    except queue.Empty:
        print("FAILED: no %s within %d s" % (what, WAIT), flush=True)
        sys.exit(1)


class V311:
    """An MQTT 3.1.1 connection made as the SDK makes it."""

    def __init__(self, name, port=None, clean=False, alpn=None):
        self.messages = queue.Queue()
        if alpn is None:
            # The SDK's builder, as its samples use it (a port other than 443: no ALPN).
            self.conn = mqtt_connection_builder.mtls_from_path(
                endpoint="localhost", port=port or mqtt_port,
                cert_filepath=name + ".chain.pem", pri_key_filepath=name + ".key",
                ca_filepath=CA, client_id=name, clean_session=clean, keep_alive_secs=30)
        else:
            # What the builder does on port 443: the same TLS options with an ALPN list.
            opts = io.TlsContextOptions.create_client_with_mtls_from_path(
                name + ".chain.pem", name + ".key")
            opts.override_default_trust_store_from_path(None, CA)
            opts.alpn_list = [alpn]
            client = mqtt.Client(io.ClientBootstrap.get_or_create_static_default(),
                                 io.ClientTlsContext(opts))
            self.conn = mqtt.Connection(client=client, host_name="localhost", port=port,
                                        client_id=name, clean_session=clean, keep_alive_secs=30)
        # Every message, those of a resumed session's subscriptions included, set before
        # CONNECT so that none arriving right after CONNACK is missed.
        self.conn.on_message(self.on_message)

    def connect(self):
        return self.conn.connect().result(WAIT)["session_present"]

    def on_message(self, topic, payload, dup, qos, retain, **kwargs):
        self.messages.put((topic, payload, retain))

    def subscribe(self, topic_filter, qos=mqtt.QoS.AT_LEAST_ONCE):
        future, _ = self.conn.subscribe(topic_filter, qos)
        return future.result(WAIT)["qos"]

    def publish(self, topic, payload, qos=mqtt.QoS.AT_LEAST_ONCE, retain=False):
        future, _ = self.conn.publish(topic, payload, qos, retain=retain)
        future.result(WAIT)

    def message(self, what):
        return take(self.messages, what)

    def disconnect(self):
        self.conn.disconnect().result(WAIT)


# MQTT 3.1.1: connect, subscribe, QoS 1 and 0 round trips.
d1 = V311("dev-1", clean=True)
check(d1.connect() is False, "3.1.1 connect (a clean session)")
check(d1.subscribe("sensors/dev-1/#") == mqtt.QoS.AT_LEAST_ONCE, "3.1.1 subscription granted QoS 1")
d1.publish("sensors/dev-1/temp", b"21.5")
check(d1.message("QoS 1 message") == ("sensors/dev-1/temp", b"21.5", False), "QoS 1 round trip")
d1.publish("sensors/dev-1/temp", b"21.6", qos=mqtt.QoS.AT_MOST_ONCE)
check(d1.message("QoS 0 message")[1] == b"21.6", "QoS 0 round trip")

# Retained: a later subscriber (another device) gets the last retained message, flagged.
d1.publish("sensors/dev-1/status", b"online", retain=True)
d1.message("own status message")
d2 = V311("dev-2", clean=False)
check(d2.connect() is False, "second device connects")
d2.subscribe("sensors/dev-1/status")
check(d2.message("retained message") == ("sensors/dev-1/status", b"online", True),
      "retained message delivered with the retain flag")
d2.subscribe("sensors/+/temp")
d2.disconnect()

# Persistent session: what was published while dev-2 was away is delivered when it comes back.
d1.publish("sensors/dev-1/temp", b"while-away")
d1.message("own message")
d2 = V311("dev-2", clean=False)
check(d2.connect() is True, "persistent session resumed (session present)")
check(d2.message("queued message") == ("sensors/dev-1/temp", b"while-away", False),
      "queued QoS 1 message delivered")
d2.disconnect()

# A policy denial on 3.1.1 cannot be answered: the subscription fails (0x80).
try:
    granted = d1.subscribe("admin/#")
except mqtt.SubscribeError:
    granted = None  # the SDK's way of saying SUBACK 0x80
check(granted is None, "3.1.1 subscription outside the policy refused")
d1.disconnect()

# The SDK's port-443 ALPN on the listener that speaks HTTP and MQTT.
d1 = V311("dev-1", port=both_port, clean=True, alpn="x-amzn-mqtt-ca")
check(d1.connect() is False, "connect with ALPN x-amzn-mqtt-ca on the HTTP-and-MQTT listener")
d1.subscribe("sensors/dev-1/alpn")
d1.publish("sensors/dev-1/alpn", b"443")
check(d1.message("message over ALPN x-amzn-mqtt-ca")[1] == b"443", "QoS 1 round trip over x-amzn-mqtt-ca")
d1.disconnect()

# MQTT 5 with the SDK's builder.
events = {k: queue.Queue() for k in ("connected", "message", "stopped")}
client = mqtt5_client_builder.mtls_from_path(
    endpoint="localhost", port=mqtt_port, cert_filepath="dev-1.chain.pem",
    pri_key_filepath="dev-1.key", ca_filepath=CA,
    connect_options=mqtt5.ConnectPacket(client_id="dev-1", keep_alive_interval_sec=30),
    session_behavior=mqtt5.ClientSessionBehaviorType.CLEAN,
    on_lifecycle_connection_success=lambda data: events["connected"].put(data.connack_packet),
    on_lifecycle_stopped=lambda data: events["stopped"].put(True),
    on_publish_received=lambda data: events["message"].put(data.publish_packet))
client.start()
connack = take(events["connected"], "MQTT 5 CONNACK")
check(connack.reason_code == mqtt5.ConnectReasonCode.SUCCESS, "MQTT 5 connect")

sub = client.subscribe(mqtt5.SubscribePacket(subscriptions=[
    mqtt5.Subscription("sensors/dev-1/v5", mqtt5.QoS.AT_LEAST_ONCE),
    mqtt5.Subscription("admin/#", mqtt5.QoS.AT_LEAST_ONCE)])).result(WAIT)
check(sub.reason_codes[0] == mqtt5.SubackReasonCode.GRANTED_QOS_1, "MQTT 5 subscription granted")
check(sub.reason_codes[1] == mqtt5.SubackReasonCode.NOT_AUTHORIZED, "MQTT 5 subscription refused 0x87")
check(sub.reason_string is not None and "denied by policy" in sub.reason_string
      and "admin/#" in sub.reason_string, "SUBACK reason string names the decision: %r" % sub.reason_string)

done = client.publish(mqtt5.PublishPacket(topic="sensors/dev-1/v5", payload=b"five",
                                          qos=mqtt5.QoS.AT_LEAST_ONCE)).result(WAIT)
check(done.puback.reason_code == mqtt5.PubackReasonCode.SUCCESS, "MQTT 5 QoS 1 publish acknowledged")
msg = take(events["message"], "MQTT 5 message")
check((msg.topic, msg.payload) == ("sensors/dev-1/v5", b"five"), "MQTT 5 round trip")

denied = client.publish(mqtt5.PublishPacket(topic="sensors/dev-2/temp", payload=b"x",
                                            qos=mqtt5.QoS.AT_LEAST_ONCE)).result(WAIT)
check(denied.puback.reason_code == mqtt5.PubackReasonCode.NOT_AUTHORIZED, "MQTT 5 publish denied 0x87")
check(denied.puback.reason_string is not None and "denied by policy" in denied.puback.reason_string,
      "PUBACK reason string names the decision: %r" % denied.puback.reason_string)
locked = client.publish(mqtt5.PublishPacket(topic="sensors/dev-1/locked", payload=b"x",
                                            qos=mqtt5.QoS.AT_LEAST_ONCE)).result(WAIT)
check(locked.puback.reason_code == mqtt5.PubackReasonCode.NOT_AUTHORIZED
      and "denied by statement" in (locked.puback.reason_string or ""),
      "the copied policy's Deny statement applies: %r" % locked.puback.reason_string)

# The connection stayed up through the denials.
done = client.publish(mqtt5.PublishPacket(topic="sensors/dev-1/v5", payload=b"still",
                                          qos=mqtt5.QoS.AT_LEAST_ONCE)).result(WAIT)
check(done.puback.reason_code == mqtt5.PubackReasonCode.SUCCESS, "connection kept after denials")
check(take(events["message"], "message after denials").payload == b"still", "delivery after denials")
client.stop()
take(events["stopped"], "MQTT 5 stop")
print("ALL OK", flush=True)
