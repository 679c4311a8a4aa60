# The late store (paho-mqtt, PyPI): a persistent subscriber on node C subscribes at QoS 1 while
# node D learns of persistent subscriptions 1.5 s late (a fault the test injects), so the messages
# published on D meanwhile cross live and C stores them for its session. The subscriber holds
# them unacknowledged; the test, once C's metrics say every one is stored, tells this script to
# go on (a line on stdin); node C is killed (SIGKILL) and the session resumes on node D with
# every message whose publisher got a PUBACK.
# Arguments: server CA file, MQTT ports of nodes C and D, the pid of node C.
import os, queue, signal, sys, time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ca = sys.argv[1]
ports = {"C": int(sys.argv[2]), "D": int(sys.argv[3])}
pid_c = int(sys.argv[4])
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


pub = Device("dev-8")
check(pub.connect("D", clean=True)[0] == 0, "publisher connected to node D")
sub = Device("dev-7", manual_ack=True)
rc, _ = sub.connect("C", clean=True, expiry=3600)
check(rc == 0, "persistent subscriber connected to node C")
sub.c.subscribe("late/#", 1)
check(sub.next("suback") == [1], "subscribed at QoS 1")
started = time.monotonic()
sent = [b"late-%d" % i for i in range(10)]
for payload in sent:
    info = pub.c.publish("late/t", payload, qos=1)
    mid, rc = pub.next("puback")
    check(mid == info.mid and rc < 0x80, "PUBACK for %s" % payload)
# Within D's lag: they crossed live (the test checks D's and C's counters).
check(time.monotonic() - started < 1, "published within node D's lag")
held = [sub.next("message") for _ in sent]
check(sorted(m.payload for m in held) == sorted(sent), "delivered live to the subscriber on C (not acknowledged)")
print("HOLDING", flush=True)
sys.stdin.readline()
os.kill(pid_c, signal.SIGKILL)
sub.next("disconnect")
print("node C killed", flush=True)

back = Device("dev-7")
rc, present = back.connect("D", clean=False, expiry=3600)
check(rc == 0 and present, "the session resumed on node D (session present)")
got = []
deadline = time.monotonic() + WAIT
while not set(sent).issubset(got) and time.monotonic() < deadline:
    try:
        got.append(back.events["message"].get(timeout=0.5).payload)
    except queue.Empty:
        continue
missing = sorted(set(sent) - set(got))
check(not missing, "every message stored late received after C's death (missing: %s)" % missing)
back.c.disconnect()
print("ALL OK", flush=True)
