# MQTT 5 against the gateway with Python paho-mqtt (PyPI): persistent sessions and their expiry,
# message expiry (dropped when stale, remaining interval on delivery), denied publish answered
# with PUBACK 0x87 on a connection that stays, denied subscription in SUBACK, topic aliases
# refused with DISCONNECT 0x94, the broker's gauges on the admin listener, and unacknowledged
# messages resent with DUP and their packet id on a resumed session (MQTT 5 and 3.1.1).
# Arguments: MQTT port, admin port. Exits non-zero with a message on the first failure.
import queue, re, ssl, sys, time, urllib.request

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

port, admin_port = int(sys.argv[1]), int(sys.argv[2])
WAIT = 20


def check(cond, what):
    if not cond:
        print("FAILED: " + what, flush=True)
        sys.exit(1)
    print("ok " + what, flush=True)


class Device:
    def __init__(self, name, manual_ack=False, protocol=mqtt.MQTTv5):
        self.events = {k: queue.Queue() for k in ("connack", "message", "puback", "suback", "disconnect", "raw")}
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=protocol,
                        manual_ack=manual_ack)
        c.tls_set(ca_certs="data/ca/ca.pem", certfile=name + ".chain.pem", keyfile=name + ".key")
        # An IP address and no SNI: the default domain answers with a localhost certificate.
        c.tls_insecure_set(True)
        c.on_connect = lambda cl, ud, flags, rc, props: self.events["connack"].put((rc.value, flags.session_present))
        def on_message(cl, ud, msg):
            self.events["raw"].put(msg)
            self.events["message"].put(
                (msg.topic, msg.payload, getattr(msg.properties, "MessageExpiryInterval", None)))
        c.on_message = on_message
        c.on_publish = lambda cl, ud, mid, rc, props: self.events["puback"].put((mid, rc.value))
        c.on_subscribe = lambda cl, ud, mid, rcs, props: self.events["suback"].put([r.value for r in rcs])
        c.on_disconnect = lambda cl, ud, flags, rc, props: self.events["disconnect"].put(rc.value)
        self.c = c

    def connect(self, clean, expiry=None):
        if self.c.protocol == mqtt.MQTTv311:
            # paho sets 3.1.1's clean-session flag only in its constructor (pinned 2.1.0).
            self.c._clean_session = clean
            self.c.connect("127.0.0.1", port, keepalive=30)
        else:
            props = Properties(PacketTypes.CONNECT)
            if expiry is not None:
                props.SessionExpiryInterval = expiry
            self.c.connect("127.0.0.1", port, keepalive=30, clean_start=clean, properties=props)
        self.c.loop_start()
        return self.next("connack")

    def next(self, kind):
        try:
            return self.events[kind].get(timeout=WAIT)
        except queue.Empty:
            print("FAILED: no %s within %d s" % (kind, WAIT), flush=True)
            sys.exit(1)

    def publish(self, topic, payload, expiry=None, alias=None):
        props = Properties(PacketTypes.PUBLISH)
        if expiry is not None:
            props.MessageExpiryInterval = expiry
        if alias is not None:
            props.TopicAlias = alias
        info = self.c.publish(topic, payload, qos=1, properties=props)
        return info.mid

    def puback(self, mid):
        got = self.next("puback")
        check(got[0] == mid, "PUBACK for message %d" % mid)
        return got[1]

    def close(self):
        self.c.disconnect()
        self.next("disconnect")
        self.c.loop_stop()


def metrics():
    ctx = ssl.create_default_context(cafile="data/ca/ca.pem")
    ctx.check_hostname = False
    ctx.load_cert_chain("data/admin/admin.pem", "data/admin/admin.key")
    with urllib.request.urlopen("https://127.0.0.1:%d/metrics" % admin_port, context=ctx, timeout=WAIT) as r:
        return r.read().decode()


def gauge(text, name):
    m = re.search(r"^%s (\d+)" % re.escape(name), text, re.M)
    return int(m.group(1)) if m else None


# dev-1 opens a persistent session (expiry 600 s) and subscribes: one filter allowed, one denied.
sub = Device("dev-1")
code, present = sub.connect(clean=True, expiry=600)
check(code == 0 and not present, "CONNACK success, no session yet")
sub.c.subscribe([("devices/+/telemetry", 1), ("devices/#", 1)])
codes = sub.next("suback")
check(codes == [1, 0x87], "SUBACK grants QoS 1 and refuses the filter the policy does not name: %r" % codes)
sub.close()

# While dev-1 is away, dev-2 publishes: kept, a message that expires in 1 s, one that lives long.
pub = Device("dev-2")
check(pub.connect(clean=True)[0] == 0, "dev-2 connects")
check(pub.puback(pub.publish("devices/dev-2/telemetry", b"kept")) == 0, "QoS 1 publish queued for the offline session")
check(pub.puback(pub.publish("devices/dev-2/telemetry", b"short", expiry=1)) == 0, "message with 1 s expiry accepted")
check(pub.puback(pub.publish("devices/dev-2/telemetry", b"long", expiry=600)) == 0, "message with 600 s expiry accepted")
# Publishing on another device's topic: PUBACK 0x87, and the connection stays usable.
check(pub.puback(pub.publish("devices/dev-1/telemetry", b"forged")) == 0x87, "denied publish gets PUBACK 0x87")
check(pub.puback(pub.publish("devices/dev-2/telemetry", b"after")) == 0, "the same connection publishes again")
text = metrics()
check((gauge(text, "portcullis_mqtt_queued_messages") or 0) >= 4, "queued messages gauge counts the offline session's queue")
check(gauge(text, "portcullis_mqtt_sessions_offline") == 1, "one offline session")
check('portcullis_mqtt_denials_total{action="publish",reason="not-allowed"}' in text, "denials counted by action and reason")
check('portcullis_mqtt_denials_total{action="subscribe",reason="not-allowed"}' in text, "subscription denial counted")
# A topic alias (the server allows none): DISCONNECT 0x94.
pub.publish("devices/dev-2/telemetry", b"aliased", alias=1)
check(pub.next("disconnect") == 0x94, "topic alias refused with DISCONNECT 0x94")
pub.c.loop_stop()

# Let the 1 s message expire: the passage of time is what is under test here.
time.sleep(1.5)
code, present = sub.connect(clean=False, expiry=600)
check(code == 0 and present, "the persistent session is resumed")
got = [sub.next("message") for _ in range(3)]
payloads = [g[1] for g in got]
check(payloads == [b"kept", b"long", b"after"], "queued messages delivered in order, the expired one dropped: %r" % payloads)
left = got[1][2]
check(left is not None and 0 < left < 600, "the delivered expiry is what remains (%r s)" % left)
check(sub.events["message"].empty(), "nothing else delivered")
sub.close()

# Session expiry: a session that expires 1 s after its client leaves is gone when it returns late.
short = Device("dev-3")
check(short.connect(clean=True, expiry=1) == (0, False), "dev-3 connects with a 1 s session expiry")
short.close()
time.sleep(1.5)
check(short.connect(clean=False, expiry=1) == (0, False), "after the expiry the session is new")
short.close()

# A QoS 1 message sent and not acknowledged is sent again when the session resumes: same packet
# id, DUP set (MQTT 5 §4.4, 3.1.1 §4.4), in both protocol versions.
for protocol, label in ((mqtt.MQTTv5, "MQTT 5"), (mqtt.MQTTv311, "MQTT 3.1.1")):
    late = Device("dev-3", manual_ack=True, protocol=protocol)
    late.connect(clean=True, expiry=600)
    late.close()
    late.connect(clean=False, expiry=600)
    late.c.subscribe("devices/+/telemetry", qos=1)
    late.next("suback")
    pub = Device("dev-2")
    check(pub.connect(clean=True)[0] == 0, "dev-2 connects again (%s)" % label)
    pub.publish("devices/dev-2/telemetry", b"unacked")
    pub.next("puback")
    first = late.next("raw")
    check(first.payload == b"unacked" and not first.dup, "%s: first delivery without DUP" % label)
    # Not acknowledged (manual ack): the client leaves and comes back.
    late.close()
    code, present = late.connect(clean=False, expiry=600)
    check(present, "%s: session resumed" % label)
    again = late.next("raw")
    check(again.payload == b"unacked" and again.dup and again.mid == first.mid,
          "%s: resent with DUP and the same packet id (%d, %d)" % (label, first.mid, again.mid))
    late.c.ack(again.mid, again.qos)
    late.close()
    pub.close()
print("ALL OK", flush=True)
