# A hand-written client for the attack tests: sends exactly the bytes (HTTP/1.1) or frames
# (HTTP/2) a test gives it over TLS and prints what came back, as JSON. The test then checks
# both that and what the recording upstream received.
#
#   attack.py http1 PORT SNI CLIENT   stdin: a JSON list of raw requests, sent one after another
#                                     on one connection; prints a JSON list of answers
#                                     ({"status", "headers", "body"}, or {"closed": true})
#   attack.py h2 PORT SNI CLIENT      stdin: a JSON list of {"headers": [[name, value]…],
#                                     "body": text, "trailers": [[name, value]…]}, one stream
#                                     each on one connection; prints a
#                                     JSON list of {"status", "headers", "body"} or {"reset": code}
#   attack.py ws PORT SNI CLIENT PATH opens a WebSocket, prints "open <status> <local port>", then sends a
#                                     line every 100 ms and prints "closed <seconds>" when the
#                                     connection ends (read-only after stdin closes).
#   attack.py hold PORT SNI CLIENT KIND [PATH]
#                                     KIND http1, h2 or mqtt: makes one request (GET PATH,
#                                     default /hold; an
#                                     MQTT 3.1.1 CONNECT with the client id CLIENT), prints
#                                     "ready <status>", then waits and prints "closed <unix time>"
#                                     when the gateway closes the connection.
#
# CLIENT names the certificate files CLIENT.chain.pem / CLIENT.key, or "-" for none. Every
# socket has a 20 s timeout.
import base64, json, os, socket, ssl, sys, time


def tls(port, sni, client, alpn):
    ctx = ssl.create_default_context(cafile="data/ca/ca.pem")
    ctx.check_hostname = False
    if client != "-":
        ctx.load_cert_chain(client + ".chain.pem", client + ".key")
    ctx.set_alpn_protocols([alpn])
    raw = socket.create_connection(("127.0.0.1", int(port)), timeout=20)
    return ctx.wrap_socket(raw, server_hostname=sni)


def read_response(f):
    status = f.readline()
    if not status:
        return {"closed": True}
    code = int(status.split(b" ")[1])
    headers = []
    while True:
        line = f.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        headers.append([k.strip().lower(), v.strip()])
    get = lambda n: [v for k, v in headers if k == n]
    if code == 101 or code in (204, 304):
        body = b""
    elif any("chunked" in v for v in get("transfer-encoding")):
        body = b""
        while True:
            size = int(f.readline().split(b";")[0], 16)
            if size == 0:
                while f.readline() not in (b"\r\n", b"\n", b""):
                    pass
                break
            body += f.read(size)
            f.read(2)
    elif get("content-length"):
        body = f.read(int(get("content-length")[0]))
    else:
        body = f.read()
    return {"status": code, "headers": headers, "body": body.decode("latin-1")}


def http1(port, sni, client):
    requests = json.load(sys.stdin)
    try:
        s = tls(port, sni, client, "http/1.1")
    except (ConnectionError, ssl.SSLError, OSError) as e:
        print(json.dumps([{"closed": True, "error": str(e)}]))
        return
    f = s.makefile("rb")
    answers = []
    for raw in requests:
        try:
            s.sendall(raw.encode("latin-1"))
            answer = read_response(f)
        except (ConnectionError, ssl.SSLError, OSError) as e:
            answer = {"closed": True, "error": str(e)}
        answers.append(answer)
        if answer.get("closed") or answer.get("status") == 101:
            break
    print(json.dumps(answers))


def h2(port, sni, client):
    import h2.config, h2.connection, h2.events
    requests = json.load(sys.stdin)
    s = tls(port, sni, client, "h2")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="latin-1", validate_outbound_headers=False, normalize_outbound_headers=False))
    conn.initiate_connection()
    results = {}
    order = []
    for r in requests:
        sid = conn.get_next_available_stream_id()
        order.append(sid)
        body = r.get("body", "").encode("latin-1")
        trailers = r.get("trailers", [])
        conn.send_headers(sid, [(k, v) for k, v in r["headers"]], end_stream=not body and not trailers)
        if body:
            conn.send_data(sid, body, end_stream=not trailers)
        if trailers:
            conn.send_headers(sid, [(k, v) for k, v in trailers], end_stream=True)
        results[sid] = {"headers": [], "body": ""}
    s.sendall(conn.data_to_send())
    open_streams = set(order)
    while open_streams:
        data = s.recv(65536)
        if not data:
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                hs = [[k, v] for k, v in event.headers]
                results[event.stream_id]["headers"] = hs
                results[event.stream_id]["status"] = int(dict(hs)[":status"])
            elif isinstance(event, h2.events.DataReceived):
                results[event.stream_id]["body"] += event.data.decode("latin-1")
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                open_streams.discard(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                results[event.stream_id]["reset"] = int(event.error_code)
                open_streams.discard(event.stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                open_streams.clear()
        s.sendall(conn.data_to_send())
    print(json.dumps([results[sid] for sid in order]))


def ws(port, sni, client, path):
    s = tls(port, sni, client, "http/1.1")
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (path, sni, key)).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            break
        head += chunk
    status = head.split(b" ")[1].decode() if head else "none"
    print("open %s %d" % (status, s.getsockname()[1]), flush=True)
    if status != "101":
        return
    s.settimeout(0.1)
    opened = time.monotonic()
    while True:
        try:
            s.sendall(b"ping\n")
            data = s.recv(4096)
            if not data:
                break
        except socket.timeout:
            continue
        except (ConnectionError, ssl.SSLError, OSError):
            break
        time.sleep(0.1)
    print("closed %.2f" % (time.monotonic() - opened), flush=True)


def hold(port, sni, client, kind, path="/hold"):
    s = tls(port, sni, client, {"http1": "http/1.1", "h2": "h2", "mqtt": "mqtt"}[kind])
    if kind == "http1":
        s.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path, sni)).encode())
        status = read_response(s.makefile("rb")).get("status")
    elif kind == "h2":
        import h2.config, h2.connection, h2.events
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="latin-1"))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", sni), (":path", path)], end_stream=True)
        s.sendall(conn.data_to_send())
        status = None
        while status is None:
            for event in conn.receive_data(s.recv(65536)):
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[":status"]
            s.sendall(conn.data_to_send())
    else:
        cid = client.encode()
        body = b"\x00\x04MQTT\x04\x02\x00\x00" + len(cid).to_bytes(2, "big") + cid
        s.sendall(bytes([0x10, len(body)]) + body)
        ack = s.recv(4)
        status = "connack-%d" % ack[3] if len(ack) == 4 and ack[0] == 0x20 else "no-connack"
    print("ready %s" % status, flush=True)
    s.settimeout(None)
    try:
        while s.recv(65536):
            pass
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    print("closed %.3f" % time.time(), flush=True)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"http1": http1, "h2": h2, "ws": ws, "hold": hold}[cmd](*args)
