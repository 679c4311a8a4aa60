# MQTT 5 across a cluster of three gateway nodes with Python paho-mqtt (PyPI): QoS 2 exactly
# once between nodes, shared subscriptions balanced across nodes, retained messages kept by the
# cluster, a burst of QoS 0 messages in order per topic, a persistent session's backlog resumed
# on another node, a persistent session resumed with a session expiry of zero (on its node and on
# another) and one that took a subscription again at QoS 0, and a client id taken over from
# another node within a second.
# Arguments: server CA file, then the MQTT ports of nodes A, B and C. Device certificates
# dev-N.chain.pem / dev-N.key are in the working directory. Exits non-zero on the first failure.
import os, queue, socket, ssl, sys, time

import paho.mqtt.client as mqtt

ca, ports = sys.argv[1], {"A": int(sys.argv[2]), "B": int(sys.argv[3]), "C": int(sys.argv[4])}
WAIT = 20


def check(cond, what):
    if not cond:
        print("FAILED: " + what, flush=True)
        sys.exit(1)
    print("ok " + what, flush=True)


class Device:
    def __init__(self, name, cert=None):
        self.events = {k: queue.Queue() for k in ("connack", "message", "puback", "suback", "unsuback", "disconnect")}
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        cert = cert or name
        c.tls_set(ca_certs=ca, certfile=cert + ".chain.pem", keyfile=cert + ".key")
        # An IP address and no SNI: the default domain answers with a localhost certificate.
        c.tls_insecure_set(True)
        # No reconnection: a client taken over must stay away.
        c.reconnect_delay_set(min_delay=3600, max_delay=3600)
        c.on_connect = lambda cl, ud, flags, rc, props: self.events["connack"].put((rc.value, flags.session_present))
        c.on_message = lambda cl, ud, msg: self.events["message"].put(msg)
        c.on_publish = lambda cl, ud, mid, rc, props: self.events["puback"].put((mid, rc.value))
        c.on_subscribe = lambda cl, ud, mid, rcs, props: self.events["suback"].put([r.value for r in rcs])
        c.on_unsubscribe = lambda cl, ud, mid, rcs, props: self.events["unsuback"].put(mid)
        c.on_disconnect = lambda cl, ud, flags, rc, props: self.events["disconnect"].put((rc.value, time.monotonic()))
        self.c = c

    def connect(self, node, persistent=False, expiry=600):
        """persistent: clean start 0 and a session expiry of `expiry` seconds."""
        return self.start_connect(node, persistent, expiry).connected(node)

    def start_connect(self, node, persistent=False, expiry=600):
        """Connects in the background (see `connected`)."""
        props = None
        if persistent:
            props = mqtt.Properties(mqtt.PacketTypes.CONNECT)
            props.SessionExpiryInterval = expiry
        self.c.connect_async("127.0.0.1", ports[node], keepalive=30, clean_start=not persistent, properties=props)
        self.c.loop_start()
        return self

    def connected(self, node):
        rc, self.session_present = self.next("connack")
        check(rc == 0, "%s connected to node %s" % (self.c._client_id.decode(), node))
        return self

    def leave(self):
        self.c.disconnect()
        self.next("disconnect")
        self.c.loop_stop()

    def next(self, kind, wait=WAIT):
        try:
            return self.events[kind].get(timeout=wait)
        except queue.Empty:
            print("FAILED: no %s within %d s" % (kind, wait), flush=True)
            sys.exit(1)

    def subscribe(self, topic, qos):
        self.c.subscribe(topic, qos)
        return self.next("suback")

    def publish(self, topic, payload, qos, retain=False):
        info = self.c.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0:
            mid, rc = self.next("puback")
            check(mid == info.mid and rc < 0x80, "PUBACK/PUBCOMP for %s (reason %d)" % (topic, rc))


# QoS 2 between nodes: delivered once, at QoS 2.
sub = Device("dev-1").connect("A")
check(sub.subscribe("devices/+/telemetry", 2) == [2], "QoS 2 granted")
pub = Device("dev-3").connect("C")
pub.publish("devices/dev-3/telemetry", b"exactly-once", 2)
pub.publish("devices/dev-3/telemetry", b"after", 2)
m = sub.next("message")
check((m.topic, m.payload, m.qos) == ("devices/dev-3/telemetry", b"exactly-once", 2),
      "QoS 2 message from node C received on node A at QoS 2")
m = sub.next("message")
check(m.payload == b"after", "delivered once: the next message is the next one")

# Retained messages are the cluster's: published on C, received by a new subscription on B.
pub.publish("devices/dev-3/telemetry", b"kept", 1, retain=True)
late = Device("dev-8").connect("B")
late.subscribe("devices/+/telemetry", 1)
m = late.next("message")
check((m.topic, m.payload, m.retain) == ("devices/dev-3/telemetry", b"kept", True),
      "a retained message published on node C is sent by node B on subscription")

# A retained QoS 0 message also reaches the subscribers of the moment on the other nodes, live
# (retain flag clear, as MQTT 5 delivers it without Retain As Published).
pub.c.publish("devices/dev-3/telemetry", b"kept-0", qos=0, retain=True)
pub.next("puback")  # (paho tells of a QoS 0 message too, once written)
for who, node in ((sub, "A"), (late, "B")):
    m = who.next("message")
    while m.payload == b"kept":  # A's subscriber had the QoS 1 one live before
        m = who.next("message")
    check((m.topic, m.payload, m.retain) == ("devices/dev-3/telemetry", b"kept-0", False),
          "a retained QoS 0 message published on node C reaches a subscriber on node %s live" % node)
# The QoS 1 one retained again, as later steps expect.
pub.publish("devices/dev-3/telemetry", b"kept", 1, retain=True)

# Shared subscriptions: each message to one member of the group, members on two nodes.
w1, w2 = Device("dev-4").connect("A"), Device("dev-5").connect("B")
for w in (w1, w2):
    check(w.subscribe("$share/workers/jobs/#", 1) == [1], "shared subscription granted")
watcher = Device("dev-2").connect("C")
watcher.subscribe("jobs/#", 1)
producer = Device("dev-6").connect("C")
N = 40
for i in range(N):
    producer.publish("jobs/%d" % i, str(i).encode(), 1)
seen = [watcher.next("message").payload for _ in range(N)]
check(sorted(seen) == sorted(str(i).encode() for i in range(N)), "an ordinary subscriber gets every job")
got = {"A": [], "B": []}
deadline = time.monotonic() + WAIT
while len(got["A"]) + len(got["B"]) < N and time.monotonic() < deadline:
    for node, w in (("A", w1), ("B", w2)):
        try:
            got[node].append(w.events["message"].get(timeout=0.05).payload)
        except queue.Empty:
            pass
everything = got["A"] + got["B"]
check(len(everything) == N and len(set(everything)) == N,
      "each of %d jobs went to exactly one member (A %d, B %d)" % (N, len(got["A"]), len(got["B"])))
check(len(got["A"]) > 0 and len(got["B"]) > 0, "both nodes' members got jobs")

# A burst of QoS 0 messages on two topics from node C: they cross NATS a topic's several at a
# time; node A's subscriber gets every one, in order per topic. (Regression: a session took 256
# messages from its channel per turn and dropped the 257th it had already taken — one lost
# message per 256 arriving at once, whatever their QoS.)
burst = Device("dev-9").connect("A")
check(burst.subscribe("jobs/#", 0) == [0], "QoS 0 subscription on node A granted")
B = 600
for i in range(B):
    producer.c.publish("jobs/burst/%s" % "xy"[i % 2], b"%d" % i, qos=0)
arrived = {"jobs/burst/x": [], "jobs/burst/y": []}
for _ in range(B):
    m = burst.next("message")
    arrived[m.topic].append(int(m.payload))
check(arrived["jobs/burst/x"] == list(range(0, B, 2)) and arrived["jobs/burst/y"] == list(range(1, B, 2)),
      "%d QoS 0 messages from node C all on node A, in order per topic" % B)

# QoS 0 messages of many topics from node A to subscribers on nodes B and C: they cross in
# batches for each node that wants them (the route table), many topics to a batch; each
# subscriber gets every one, once, in order per topic. The subscription on C is made just before
# the messages: its SUBACK comes once every node's route table has it.
check(late.subscribe("fleet/#", 0) == [0], "QoS 0 subscription to fleet/# on node B granted")
# (C's filter begins with a wildcard: C subscribes on NATS to each kind's subjects apart.)
check(watcher.subscribe("+/+/t", 0) == [0], "QoS 0 subscription to +/+/t on node C granted")
F, T = 400, 20
for i in range(F):
    burst.c.publish("fleet/%d/t" % (i % T), b"%d" % i, qos=0)
want = {"fleet/%d/t" % t: list(range(t, F, T)) for t in range(T)}
for node, d in (("B", late), ("C", watcher)):
    got, n = {}, 0
    while n < F:
        m = d.next("message")
        if m.topic.startswith("fleet/"):
            got.setdefault(m.topic, []).append(int(m.payload))
            n += 1
    check(got == want, "%d QoS 0 messages of %d topics from node A on node %s, once each, in order per topic" % (F, T, node))

# A persistent session's backlog larger than its queue (1,000): QoS 1 messages published on node
# C while it is away are stored a batch at a time; resumed on node B, it receives each once, in
# order (kept batches wait for room in the session's queue rather than overflow it and come
# back). The shared group's members stay online and take the same messages. (Regression: with the
# stream kept by interest, nats-server 2.9 under load lost 1 to 25 of them for the session once
# the group had acknowledged them.)
away = Device("dev-1-away", cert="dev-1").connect("A", persistent=True)
check(away.subscribe("jobs/#", 1) == [1], "persistent subscription on node A granted")
away.c.disconnect()
away.next("disconnect")
away.c.loop_stop()
K = 2500
waiting = {producer.c.publish("jobs/backlog", b"%d" % i, qos=1).mid for i in range(K)}
refused = []
while waiting:
    # (Earlier QoS 0 publications were reported here too: skipped.)
    mid, rc = producer.next("puback")
    if mid in waiting:
        waiting.discard(mid)
        refused += [rc] if rc >= 0x80 else []
check(not refused, "%d QoS 1 messages acknowledged on node C" % K)
back = Device("dev-1-away", cert="dev-1").connect("B", persistent=True)
got = []
while len(got) < K:
    try:
        got.append(int(back.events["message"].get(timeout=WAIT).payload))
    except queue.Empty:
        missing = sorted(set(range(K)) - set(got))
        check(False, "kept messages on node B: %d of %d (%d distinct), then none for %d s (missing: %s)"
              % (len(got), K, len(set(got)), WAIT, missing[:10]))
def first_difference(got, want):
    at = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), len(want))
    twice = sorted(m for m in set(got) if got.count(m) > 1)
    return "first difference at %d: %s; received twice: %s" % (at, got[max(0, at - 3):at + 5], twice[:10])
check(got == list(range(K)), "%d kept messages received on node B once each, in order%s"
      % (K, "" if got == list(range(K)) else " (" + first_difference(got, list(range(K))) + ")"))
producer.publish("jobs/backlog", b"end", 1)
check(back.next("message").payload == b"end", "nothing came twice before the next message")
back.leave()

# A persistent session resumed with a session expiry of zero (MQTT 5: clean start 0, the session
# ends with the connection) on the node that held it and on another: it gets what was kept while
# it was away and new QoS 1 messages, its QoS 0 subscription comes back with it, and a filter it
# took again at QoS 0 delivers at QoS 0 only (also when both SUBSCRIBEs come at once), one
# unsubscribed at once after its QoS 1 SUBSCRIBE delivers nothing, kept or live; once the
# connection ends, the session is gone.
# (Regressions: resumed with expiry 0, the session received no QoS 1 message at all on its own
# node and lost its subscriptions on another; a filter taken again at QoS 0 kept its QoS 1
# consumer, so messages came twice, and at QoS 1 on another node; a persistent session's QoS 0
# subscriptions did not survive its node; a QoS 1 subscription still being made could undo a
# QoS 0 one or an unsubscription that came right after it.)
for i, (held, resumed) in enumerate((("A", "A"), ("A", "B"))):
    name = "dev-2-zero-%d" % i
    topic = "jobs/zero/%d" % i
    z = Device(name, cert="dev-2").connect(held, persistent=True)
    check(z.subscribe(topic + "/q1", 1) == [1] and z.subscribe(topic + "/q0", 0) == [0],
          "persistent subscriptions at QoS 1 and 0 on node " + held)
    check(z.subscribe(topic + "/again", 1) == [1] and z.subscribe(topic + "/again", 0) == [0],
          "a filter taken at QoS 1, then again at QoS 0")
    # Sent back to back, each before the previous one is answered.
    z.c.subscribe(topic + "/piped", 1)
    z.c.subscribe(topic + "/piped", 0)
    z.c.subscribe(topic + "/gone", 1)
    z.c.unsubscribe(topic + "/gone")
    check([z.next("suback") for _ in range(3)] == [[1], [0], [1]] and z.next("unsuback"),
          "QoS 1 then QoS 0, and QoS 1 then unsubscribed, each pair sent at once")
    # Subscribed; then, sent at once, another filter (its consumer takes the cluster a moment),
    # the first unsubscribed and taken again.
    check(z.subscribe(topic + "/back", 1) == [1], "a filter taken at QoS 1")
    z.c.subscribe(topic + "/other", 1)
    z.c.unsubscribe(topic + "/back")
    z.c.subscribe(topic + "/back", 1)
    check([z.next("suback") for _ in range(2)] == [[1], [1]] and z.next("unsuback"),
          "another filter, then the first unsubscribed and taken again at QoS 1, sent at once")
    z.leave()
    producer.publish(topic + "/gone", b"not-kept", 1)
    producer.publish(topic + "/piped", b"not-kept", 1)
    producer.publish(topic + "/back", b"kept-back", 1)
    producer.publish(topic + "/q1", b"kept", 1)
    z = Device(name, cert="dev-2").connect(resumed, persistent=True, expiry=0)
    check(z.session_present, "resumed with a session expiry of zero on node %s: session present" % resumed)
    got = sorted((m.topic, m.payload, m.qos) for m in (z.next("message") for _ in range(2)))
    check(got == [(topic + "/back", b"kept-back", 1), (topic + "/q1", b"kept", 1)],
          "the QoS 1 messages kept while away are delivered on node %s, the filter taken again included (%s)" % (resumed, got))
    producer.publish(topic + "/q1", b"live", 1)
    m = z.next("message")
    check((m.topic, m.payload, m.qos) == (topic + "/q1", b"live", 1), "a new QoS 1 message is delivered")
    producer.publish(topic + "/q0", b"zero", 1)
    m = z.next("message")
    check((m.topic, m.payload, m.qos) == (topic + "/q0", b"zero", 0), "the QoS 0 subscription came back with the session")
    producer.publish(topic + "/again", b"once", 1)
    producer.publish(topic + "/gone", b"gone", 1)
    producer.publish(topic + "/piped", b"piped", 1)
    producer.publish(topic + "/q1", b"after", 1)
    got = sorted((m.topic, m.payload, m.qos) for m in (z.next("message") for _ in range(3)))
    check(got == [(topic + "/again", b"once", 0), (topic + "/piped", b"piped", 0), (topic + "/q1", b"after", 1)],
          "the filters taken again at QoS 0 deliver at QoS 0, once; the unsubscribed one nothing (%s)" % got)
    producer.publish(topic + "/q1", b"last", 1)
    m = z.next("message")
    check(m.payload == b"last", "nothing came twice (%s %s)" % (m.topic, m.payload))
    z.leave()
    # The next CONNECT may reach the node before the old connection's DISCONNECT is handled:
    # then it takes the session over (still present, as MQTT says) and ends it again when it
    # leaves. A session that never ends is present every time.
    for attempt in range(1, 6):
        z = Device(name, cert="dev-2").connect(resumed, persistent=True, expiry=0)
        present = z.session_present
        z.leave()
        if not present:
            break
    check(not present, "the session ended with its expiry-zero connection (attempt %d)" % attempt)

# An expiry-zero session ending on node A while the client resumes it at once on node B (or on
# A itself): the new connection either resumes it whole or starts anew — never a session present
# whose kept messages the ending connection deleted under it. (Regression: A ended the session after B had resumed it, deleting the
# consumers B delivered from: B's QoS 1 messages were lost. Found with RACE_ROUNDS=200 on a
# loaded machine once the record's compare-and-set was in place: nats-server 2.9 let A's purge
# and B's resume, in flight at the same moment, both succeed.)
name, topic = "dev-2-race", "jobs/zero/race"


def raw_resume(node, client_id, cert, expiry):
    """A TLS connection to `node`, ready to send an MQTT 5 CONNECT (clean start 0, session
    expiry `expiry`) the moment it is asked: (socket, the CONNECT)."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(cert + ".chain.pem", cert + ".key")
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", ports[node]), timeout=WAIT))
    props = b"\x11" + expiry.to_bytes(4, "big")
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x05\x00" + (30).to_bytes(2, "big") + bytes([len(props)]) + props
    body += len(cid).to_bytes(2, "big") + cid
    return sock, b"\x10" + bytes([len(body)]) + body


resumed_on_b = 0
ROUNDS = int(os.environ.get("RACE_ROUNDS", "8"))  # more to stress it
for attempt in range(ROUNDS):
    z = Device(name, cert="dev-2").connect("A", persistent=True, expiry=0)
    check(z.subscribe(topic, 1) == [1], "subscribed at QoS 1 on node A (round %d)" % attempt)
    # Odd rounds on node A itself: a newer connection there claims the client id before the
    # older one's end is handled.
    to = "A" if attempt % 2 else "B"
    sock, connect = raw_resume(to, name, "dev-2", 600)
    # The CONNECT to B, then the DISCONNECT to A (paho writes it at once) as B claims the
    # client id: a little later each round, to meet the moment B reads the session.
    sock.sendall(connect)
    time.sleep((attempt % 8) * 0.00015)
    z.c.disconnect()
    ack = sock.recv(5)
    check(ack[:1] == b"\x20" and ack[3] == 0, "resumed on node %s at once (CONNACK %s)" % (to, ack.hex()))
    present = bool(ack[2] & 1)
    resumed_on_b += present
    sock.sendall(b"\xe0\x00")  # DISCONNECT: the session stays, for 600 s
    sock.close()
    z.next("disconnect")
    z.c.loop_stop()
    payload = b"race-%d" % attempt
    if present:
        # Kept while the session is away from B: by the consumers A must not have deleted.
        producer.publish(topic, payload, 1)
    y = Device(name, cert="dev-2").connect(to, persistent=True, expiry=600)
    check(y.session_present, "the session left on node %s is there" % to)
    if not present:
        check(y.subscribe(topic, 1) == [1], "subscribed again on node %s (the session ended first)" % to)
        producer.publish(topic, payload, 1)
    # A message kept just as a session's puller stops can reach its pull request before the
    # NATS servers know nobody reads it: it comes again after the acknowledgement wait (3 s).
    deadline = time.monotonic() + WAIT
    while True:
        try:
            m = y.events["message"].get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            check(False, "round %d: the QoS 1 message never reached the session on node %s (resumed as it ended: %s)" % (attempt, to, present))
        if m.payload == payload:
            break
    waited = time.monotonic() - (deadline - WAIT)
    check(True, "the QoS 1 message reached the session on node %s after %.0f ms (resumed as it ended: %s)" % (to, waited * 1000, present))
    y.leave()
print("expiry-zero session resumed (on node B, or again on A) as it ended: %d of %d rounds" % (resumed_on_b, ROUNDS), flush=True)

# Takeover: the same client id on node C closes the session on node A within a second.
first = Device("dev-7").connect("A")
second = Device("dev-7")
started = time.monotonic()
second.connect("C")
rc, at = first.next("disconnect")
check(rc == 0x8E, "the first connection was told 'session taken over' (reason %#x)" % rc)
took = at - started
print("takeover across nodes: %.0f ms" % (took * 1000), flush=True)
check(took < 1.0, "taken over within a second")

# Overlapping persistent subscriptions, one with No Local: the session's own publication matches
# both; the No Local one leaves it out, the other delivers it, once. (Regression, found by
# review: the copy No Local left out was settled at once and remembered as acknowledged, and the
# other subscription's copy of the same kept message was then skipped as delivered: lost.)
for n in range(3):
    own = Device("dev-2-own%d" % n, cert="dev-2").connect("B", persistent=True)
    own.c.subscribe("jobs/#", options=mqtt.SubscribeOptions(qos=1, noLocal=True))
    check(own.next("suback") == [1], "jobs/# at QoS 1 with No Local")
    check(own.subscribe("jobs/zero/own%d" % n, 1) == [1], "jobs/zero/own%d at QoS 1" % n)
    own.publish("jobs/zero/own%d" % n, b"mine", 1)
    m = own.next("message")
    check((m.topic, m.payload) == ("jobs/zero/own%d" % n, b"mine"),
          "its own publication reached it through the subscription without No Local (%s)" % m.topic)
    try:
        extra = own.events["message"].get(timeout=0.5)
        check(False, "delivered once (then %s %s)" % (extra.topic, extra.payload))
    except queue.Empty:
        pass
    own.leave()

print("ALL OK", flush=True)
