# A persistent MQTT 5 session survives the death of its node (paho-mqtt, PyPI): a subscriber on
# node A holds QoS 1 messages unacknowledged when node A is killed (SIGKILL), more messages are
# published while it is away, and it resumes its session on node B and receives every message
# whose publisher got a PUBACK. Duplicates are allowed (QoS 1), losses are not. Then No Local on
# the resumed session: its own kept publication is not delivered back to it.
# Arguments: server CA file, MQTT ports of nodes A, B and C, the pid of node A.
import os, queue, signal, sys, time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

ca = sys.argv[1]
ports = {"A": int(sys.argv[2]), "B": int(sys.argv[3]), "C": int(sys.argv[4])}
pid_a = int(sys.argv[5])
WAIT = 30


def check(cond, what):
    if not cond:
        print("FAILED: " + what, flush=True)
        sys.exit(1)
    print("ok " + what, flush=True)


class Device:
    def __init__(self, name, manual_ack=False):
        self.events = {k: queue.Queue() for k in ("connack", "message", "puback", "suback", "disconnect")}
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5,
                        manual_ack=manual_ack)
        c.tls_set(ca_certs=ca, certfile=name + ".chain.pem", keyfile=name + ".key")
        c.tls_insecure_set(True)
        c.reconnect_delay_set(min_delay=3600, max_delay=3600)
        c.on_connect = lambda cl, ud, flags, rc, props: self.events["connack"].put((rc.value, flags.session_present))
        c.on_message = lambda cl, ud, msg: self.events["message"].put(msg)
        c.on_publish = lambda cl, ud, mid, rc, props: self.events["puback"].put((mid, rc.value))
        c.on_subscribe = lambda cl, ud, mid, rcs, props: self.events["suback"].put([r.value for r in rcs])
        c.on_disconnect = lambda cl, ud, flags, rc, props: self.events["disconnect"].put(rc.value)
        self.c = c

    def connect(self, node, clean, expiry=None):
        props = Properties(PacketTypes.CONNECT)
        if expiry is not None:
            props.SessionExpiryInterval = expiry
        self.c.connect("127.0.0.1", ports[node], keepalive=30, clean_start=clean, properties=props)
        self.c.loop_start()
        return self.next("connack")

    def next(self, kind, wait=WAIT):
        try:
            return self.events[kind].get(timeout=wait)
        except queue.Empty:
            print("FAILED: no %s within %d s" % (kind, wait), flush=True)
            sys.exit(1)


sub = Device("dev-1", manual_ack=True)
rc, present = sub.connect("A", clean=True, expiry=3600)
check(rc == 0, "persistent subscriber connected to node A")
sub.c.subscribe("devices/+/telemetry", 1)
check(sub.next("suback") == [1], "subscribed at QoS 1")
pub = Device("dev-3")
check(pub.connect("C", clean=True)[0] == 0, "publisher connected to node C")

acknowledged = []


def publish(payload):
    info = pub.c.publish("devices/dev-3/telemetry", payload, qos=1)
    mid, rc = pub.next("puback")
    check(mid == info.mid and rc < 0x80, "PUBACK for %s" % payload)
    acknowledged.append(payload)


for i in range(10):
    publish(b"before-%d" % i)
# Delivered to the subscriber on A, never acknowledged by it: in flight when A dies.
held = [sub.next("message") for _ in range(3)]
check(all(m.qos == 1 for m in held), "messages in flight to the subscriber (not acknowledged)")
os.kill(pid_a, signal.SIGKILL)
sub.next("disconnect")
print("node A killed", flush=True)
for i in range(10):
    publish(b"while-away-%d" % i)

back = Device("dev-1")
started = time.monotonic()
rc, present = back.connect("B", clean=False, expiry=3600)
check(rc == 0 and present, "the session resumed on node B (session present)")
wanted = set(acknowledged)
got = []
retained = []
deadline = time.monotonic() + WAIT
while not wanted.issubset(got) and time.monotonic() < deadline:
    try:
        m = back.events["message"].get(timeout=0.5)
    except queue.Empty:
        continue
    if m.retain:
        retained.append(m.payload)
    else:
        got.append(m.payload)
check(not retained, "no retained messages sent again on resumption (got %s)" % retained)
missing = sorted(wanted - set(got))
check(not missing, "every acknowledged message received after the node's death (missing: %s)" % missing)
took = time.monotonic() - started
print("resumed on another node: %d messages (%d duplicates) within %.2f s of reconnecting"
      % (len(wanted), len(got) - len(set(got)), took), flush=True)
check(took < 10, "resumed within 10 s")

# No Local holds for what the cluster keeps: the resumed persistent session's own QoS 1
# publication comes back through the stream and is not delivered to it; another client's is.
back.c.subscribe("jobs/#", options=SubscribeOptions(qos=1, noLocal=True))
check(back.next("suback") == [1], "subscribed with No Local")
info = back.c.publish("jobs/echo", b"mine", qos=1)
check(back.next("puback")[0] == info.mid, "own publication acknowledged")
info = pub.c.publish("jobs/echo", b"theirs", qos=1)
check(pub.next("puback")[0] == info.mid, "other client's publication acknowledged")
deadline = time.monotonic() + WAIT
echoed = None
while echoed is None and time.monotonic() < deadline:
    try:
        m = back.events["message"].get(timeout=0.5)
    except queue.Empty:
        continue
    if m.topic == "jobs/echo":
        echoed = m.payload
check(echoed == b"theirs", "No Local: the first message on jobs/echo is the other client's (got %s)" % echoed)

# A shared subscription keeps its QoS 1 messages while its only member (a persistent session)
# is offline; the member resumes on another node and receives them.
worker = Device("dev-6")
rc, _ = worker.connect("B", clean=True, expiry=3600)
check(rc == 0, "persistent shared-subscription member connected to node B")
worker.c.subscribe("$share/workers/jobs/#", 1)
check(worker.next("suback") == [1], "shared subscription granted")
worker.c.disconnect()
worker.next("disconnect")
worker.c.loop_stop()
kept = [b"kept-%d" % i for i in range(5)]
for payload in kept:
    info = pub.c.publish("jobs/kept", payload, qos=1)
    check(pub.next("puback")[0] == info.mid, "PUBACK for %s while the group has no member online" % payload)
worker = Device("dev-6")
rc, present = worker.connect("C", clean=False, expiry=3600)
check(rc == 0 and present, "the shared-subscription member resumed on node C")
got = set()
deadline = time.monotonic() + WAIT
while not set(kept).issubset(got) and time.monotonic() < deadline:
    try:
        m = worker.events["message"].get(timeout=0.5)
    except queue.Empty:
        continue
    if m.topic == "jobs/kept":
        got.add(m.payload)
check(set(kept).issubset(got), "the group kept its messages for its offline member (got %s)" % sorted(got))
print("ALL OK", flush=True)
