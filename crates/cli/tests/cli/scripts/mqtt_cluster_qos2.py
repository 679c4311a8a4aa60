# QoS 2 stays exactly once when a node dies mid-exchange (MQTT 5, hand-written client: the
# test decides exactly which acknowledgement each side has seen when the node is killed).
#
# On node B, a persistent publisher sends two QoS 2 messages and gets PUBREC for both; a
# persistent subscriber receives both, acknowledges the first (PUBREC, and gets PUBREL) and not
# the second. Node B is killed (SIGKILL). On node C:
# - the publisher sends PUBREL for the first and the second again with DUP (as a client that
#   never saw its PUBREC would): PUBCOMP for both, PUBREC for the resent one, and it is stored
#   once; then a new message reusing a released packet id is not taken for a duplicate;
# - the subscriber resumes: the messages it had are sent again with the packet ids it knows them
#   by and DUP set (it acknowledges them again without delivering them twice), the new message
#   arrives; every message is delivered exactly once.
# Arguments: server CA file, MQTT ports of nodes B and C, the pid of node B.
import os, signal, socket, ssl, struct, sys, time

ca = sys.argv[1]
ports = {"B": int(sys.argv[2]), "C": int(sys.argv[3])}
pid_b = int(sys.argv[4])
TOPIC = "jobs/qos2"


def check(cond, what):
    if not cond:
        print("FAILED: " + what, flush=True)
        sys.exit(1)
    print("ok " + what, flush=True)


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(s):
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def packet(first, body):
    return bytes([first]) + varint(len(body)) + body


class Raw:
    """An MQTT 5 client speaking packets by hand; `awaiting` is its QoS 2 receive state (packet
    ids it sent PUBREC for and awaits PUBREL), kept across connections like a session."""

    def __init__(self, name):
        self.name = name
        self.awaiting = {}
        self.delivered = []
        self.sock = None

    def connect(self, node, clean):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(ca)
        ctx.check_hostname = False
        ctx.load_cert_chain(self.name + ".chain.pem", self.name + ".key")
        raw = socket.create_connection(("127.0.0.1", ports[node]), timeout=20)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.buf = b""
        flags = 0x02 if clean else 0x00
        props = b"\x11" + struct.pack(">I", 3600)  # session expiry interval
        body = utf8("MQTT") + bytes([5, flags]) + struct.pack(">H", 30)
        body += varint(len(props)) + props + utf8(self.name)
        self.sock.sendall(packet(0x10, body))
        kind, flags, body = self.read()
        check(kind == 2 and body[1] == 0, "%s connected to node %s" % (self.name, node))
        return bool(body[0] & 1)

    def read(self, timeout=20):
        self.sock.settimeout(timeout)
        while True:
            if len(self.buf) >= 2:
                n, mult, i = 0, 1, 1
                while i < len(self.buf):
                    b = self.buf[i]
                    n += (b & 0x7F) * mult
                    mult *= 128
                    i += 1
                    if not b & 0x80:
                        if len(self.buf) >= i + n:
                            first, body = self.buf[0], self.buf[i:i + n]
                            self.buf = self.buf[i + n:]
                            return first >> 4, first & 0x0F, body
                        break
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk

    def expect(self, kind, what):
        k, flags, body = self.read()
        check(k == kind, "%s (got packet type %d)" % (what, k))
        return flags, body

    def subscribe(self, topic):
        body = struct.pack(">H", 1) + b"\x00" + utf8(topic) + b"\x02"
        self.sock.sendall(packet(0x82, body))
        _, body = self.expect(9, "SUBACK")
        check(body[-1] == 2, "%s subscribed to %s at QoS 2 (reason %d)" % (self.name, topic, body[-1]))

    def publish(self, pid, payload, dup=False):
        first = 0x30 | (0x08 if dup else 0) | (2 << 1)
        body = utf8(TOPIC) + struct.pack(">H", pid) + b"\x00" + payload
        self.sock.sendall(packet(first, body))

    def ack(self, kind_first, pid):
        self.sock.sendall(packet(kind_first, struct.pack(">H", pid)))

    def expect_ack(self, kind, pid, what):
        _, body = self.expect(kind, what)
        got = struct.unpack(">H", body[:2])[0]
        reason = body[2] if len(body) > 2 else 0
        check(got == pid and reason < 0x80, "%s (packet id %d, reason %d)" % (what, got, reason))

    def parse_publish(self, flags, body):
        n = struct.unpack(">H", body[:2])[0]
        topic = body[2:2 + n].decode()
        pid = struct.unpack(">H", body[2 + n:4 + n])[0]
        i = 4 + n
        plen, mult = 0, 1
        while True:
            b = body[i]
            i += 1
            plen += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        return topic, pid, bool(flags & 0x08), bytes(body[i + plen:])

    def on_publish(self, flags, body, answer=True):
        """A QoS 2 PUBLISH as a receiver handles it (MQTT 5 §4.3.3): delivered on first receipt,
        its packet id then held until PUBREL; the same packet id again is acknowledged, not
        delivered again."""
        topic, pid, dup, payload = self.parse_publish(flags, body)
        if pid not in self.awaiting:
            self.delivered.append(payload)
            self.awaiting[pid] = payload
        if answer:
            self.ack(0x50, pid)
        return pid, dup, payload


pub = Raw("dev-5")
sub = Raw("dev-4")
sub.connect("B", clean=True)
sub.subscribe("jobs/#")
pub.connect("B", clean=True)

pub.publish(10, b"in-1")
pub.expect_ack(5, 10, "PUBREC for in-1 (stored by the cluster)")
pub.publish(11, b"in-2")
pub.expect_ack(5, 11, "PUBREC for in-2 (stored by the cluster)")

first = {}
while len(first) < 2:
    k, flags, body = sub.read()
    check(k == 3 and (flags >> 1) & 3 == 2, "a QoS 2 PUBLISH for the subscriber")
    pid, dup, payload = sub.on_publish(flags, body, answer=False)
    first[payload] = pid
check(set(first) == {b"in-1", b"in-2"}, "the subscriber received both")
sub.ack(0x50, first[b"in-1"])
sub.expect_ack(6, first[b"in-1"], "PUBREL for in-1 (the subscriber's PUBREC seen)")
# in-1: PUBREC sent, PUBREL received, PUBCOMP never sent. in-2: received, never acknowledged.

os.kill(pid_b, signal.SIGKILL)
print("node B killed", flush=True)

# The publisher resumes on node C: releases in-1, sends in-2 again (DUP), releases it.
present = pub.connect("C", clean=False)
check(present, "the publisher's session resumed on node C")
pub.publish(11, b"in-2", dup=True)
pub.expect_ack(5, 11, "PUBREC for in-2 sent again with DUP")
pub.ack(0x62, 10)
pub.expect_ack(7, 10, "PUBCOMP for in-1, released on another node")
pub.ack(0x62, 11)
pub.expect_ack(7, 11, "PUBCOMP for in-2")
# A released packet id used again for a new message: a new message, not a duplicate.
pub.publish(10, b"in-3")
pub.expect_ack(5, 10, "PUBREC for in-3 (packet id 10 again)")
pub.ack(0x62, 10)
pub.expect_ack(7, 10, "PUBCOMP for in-3")

# The subscriber resumes on node C.
started = time.monotonic()
present = sub.connect("C", clean=False)
check(present, "the subscriber's session resumed on node C")
again = {}
deadline = time.monotonic() + 20
while time.monotonic() < deadline and not (b"in-3" in sub.delivered and len(again) >= 2 and not sub.awaiting):
    try:
        k, flags, body = sub.read(timeout=max(0.1, deadline - time.monotonic()))
    except socket.timeout:
        break
    if k == 3:
        pid, dup, payload = sub.on_publish(flags, body)
        if payload in first:
            again[payload] = (pid, dup)
    elif k == 6:
        pid = struct.unpack(">H", body[:2])[0]
        sub.awaiting.pop(pid, None)
        sub.ack(0x70, pid)
took = time.monotonic() - started
for payload, pid in first.items():
    got = again.get(payload)
    check(got is not None and got == (pid, True),
          "%s sent again with its packet id %d and DUP (got %s)" % (payload.decode(), pid, got))
check(sorted(sub.delivered) == [b"in-1", b"in-2", b"in-3"],
      "every message delivered exactly once (delivered: %s)" % sub.delivered)
check(not sub.awaiting, "every exchange completed (left: %s)" % sub.awaiting)
print("QoS 2 across a node's death: exchanges completed %.2f s after resuming" % took, flush=True)
print("ALL OK", flush=True)
