# A raw HTTP/1.1 upstream that records exactly what arrives, for the attack tests: every request
# head as received (header names and values as bytes, in order), its body and trailers, and every byte that
# comes through a tunnel after a 101. Argument: the log file (JSON lines, written before each
# answer, so a client that has its answer finds the record). Prints its port, then serves until
# killed.
#
# It is the upstream an attacker hopes for: it honours any upgrade (`h2c` included) with a 101,
# answers a WebSocket handshake properly, and echoes whatever the tunnel carries. Otherwise it
# answers 200 with the text "ok" (paths ending in /slow after 5 s; /drip sends its head at once
# and ends its body 5 s later).
import base64, hashlib, json, socket, sys, threading, time

log_path = sys.argv[1]
lock = threading.Lock()
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(256)
print(srv.getsockname()[1], flush=True)
conn_ids = iter(range(1, 1 << 30))


def record(entry):
    with lock:
        with open(log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()


def read_head(f):
    line = f.readline()
    if not line:
        return None
    headers = []
    while True:
        h = f.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        name, _, value = h.rstrip(b"\r\n").partition(b":")
        headers.append([name.decode("latin-1"), value.strip().decode("latin-1")])
    return line.rstrip(b"\r\n").decode("latin-1"), headers


def read_body(f, headers):
    get = lambda n: [v for k, v in headers if k.lower() == n]
    trailers = []
    if any("chunked" in v.lower() for v in get("transfer-encoding")):
        body = b""
        while True:
            size = int(f.readline().split(b";")[0], 16)
            if size == 0:
                while True:
                    line = f.readline()
                    if line in (b"\r\n", b"\n", b""):
                        return body, trailers
                    name, _, value = line.rstrip(b"\r\n").partition(b":")
                    trailers.append([name.decode("latin-1"), value.strip().decode("latin-1")])
            body += f.read(size)
            f.read(2)
    lengths = get("content-length")
    return (f.read(int(lengths[0])) if lengths else b""), trailers


def handle(conn, cid):
    f = conn.makefile("rb")
    while True:
        head = read_head(f)
        if head is None:
            break
        line, headers = head
        body, trailers = read_body(f, headers)
        record({"conn": cid, "kind": "request", "line": line, "headers": headers,
                "body": body.decode("latin-1"), "trailers": trailers})
        get = lambda n: [v for k, v in headers if k.lower() == n]
        upgrade = get("upgrade")
        if upgrade:
            answer = "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: %s\r\n" % upgrade[0]
            key = get("sec-websocket-key")
            if key:
                accept = base64.b64encode(hashlib.sha1(
                    (key[0] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
                answer += "Sec-WebSocket-Accept: %s\r\n" % accept
            conn.sendall((answer + "\r\n").encode())
            # The tunnel: record and echo whatever comes.
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                record({"conn": cid, "kind": "tunnel", "bytes": data.decode("latin-1")})
                conn.sendall(data)
            break
        if line.split(" ")[1].split("?")[0].endswith("/drip"):
            # Answers at once, then holds the body back a while.
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
            time.sleep(5)
            conn.sendall(b"0\r\n\r\n")
            continue
        if line.split(" ")[1].split("?")[0].endswith("/slow"):
            # A slow upstream, for requests that must stay open a while.
            time.sleep(5)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")
    conn.close()


while True:
    c, _ = srv.accept()
    threading.Thread(target=handle, args=(c, next(conn_ids)), daemon=True).start()
