# Abuse against the gateway's HTTPS port. Arguments: MODE PORT [N]. Run from the test directory
# (alice.chain.pem, alice.key, data/ca/ca.pem). Prints one result line per check; exits non-zero
# with a message on the first failure.
#
#   malformed PORT        malformed and oversized HTTP/1.1 requests, each on its own connection
#   slowloris PORT N      N clients that finish the handshake, then send a request head a byte
#                         at a time; prints how long the gateway took to close the slowest one
#   drop PORT N           N connections that send part of a real ClientHello (or nothing) and
#                         disappear, some with a reset; 200 at a time
#   flood PORT SECONDS    full handshakes as fast as 16 threads can go, plus 64 connections that
#                         send nothing; prints the handshakes completed
#   hold PORT N           opens N TCP connections that send nothing and holds them until stdin
#                         closes (prints "holding N")
import os, random, socket, ssl, struct, sys, threading, time

mode, port = sys.argv[1], int(sys.argv[2])


def context():
    ctx = ssl.create_default_context(cafile="data/ca/ca.pem")
    ctx.load_cert_chain("alice.chain.pem", "alice.key")
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def tls(ctx=None, timeout=20):
    ctx = ctx or context()
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return ctx.wrap_socket(s, server_hostname="a.test")


def status_and_close(s):
    """The status of the first answer, and whether the gateway then closed the connection."""
    data = b""
    status = None
    try:
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        status = int(data.split(b" ")[1]) if data.startswith(b"HTTP/1.1 ") else None
        # After an error answer the connection must end (no reuse of a confused stream).
        closed = False
        s.settimeout(5)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                closed = True
                break
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        closed = True
    except socket.timeout:
        closed = False
    return status, closed


def malformed():
    long_header = b"X-Big: " + b"a" * 40000 + b"\r\n"
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(400))
    cases = [
        ("oversized-header", b"GET / HTTP/1.1\r\nHost: a.test\r\n" + long_header + b"\r\n", {431}),
        ("oversized-target", b"GET /" + b"a" * 40000 + b" HTTP/1.1\r\nHost: a.test\r\n\r\n", {414, 431}),
        ("too-many-headers", b"GET / HTTP/1.1\r\nHost: a.test\r\n" + many + b"\r\n", {431}),
        ("bad-header-name", b"GET / HTTP/1.1\r\nHost: a.test\r\nBad Header: x\r\n\r\n", {400}),
        ("nul-in-value", b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A: a\x00b\r\n\r\n", {400}),
        ("cl-and-te", b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", {400}),
        ("two-lengths", b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", {400}),
        ("bad-length", b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: -1\r\n\r\n", {400}),
        ("huge-length", b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 99999999999999999999999\r\n\r\n", {400}),
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A: a\r\n b\r\n\r\n", {400}),
        ("no-host", b"GET / HTTP/1.1\r\n\r\n", {400}),
        ("two-hosts", b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n", {400}),
        ("bad-method", b"G(T / HTTP/1.1\r\nHost: a.test\r\n\r\n", {400}),
        ("bad-version", b"GET / HTTP/7.1\r\nHost: a.test\r\n\r\n", {400, 505}),
        ("binary", bytes(range(256)) * 4 + b"\r\n\r\n", {400}),
        ("te-not-chunked", b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip\r\n\r\n", {400, 501}),
    ]
    for name, request, wanted in cases:
        s = tls()
        try:
            s.sendall(request)
        except (OSError, ssl.SSLError):
            pass  # the gateway answered and closed before the whole request was sent
        status, closed = status_and_close(s)
        s.close()
        assert status in wanted, "%s: status %r, wanted %r" % (name, status, wanted)
        assert closed, "%s: the connection stayed open after %r" % (name, status)
        print(name, status, "closed")
    # A chunked body whose chunk size is not hex: the request must not reach the upstream intact;
    # the client gets an error and the connection ends.
    s = tls()
    s.sendall(b"POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
    status, closed = status_and_close(s)
    assert status in (None, 400, 502) and closed, "bad-chunk: %r %r" % (status, closed)
    print("bad-chunk", status, "closed")
    # And the gateway still answers a normal request.
    s = tls()
    s.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
    status, _ = status_and_close(s)
    assert status == 200, "normal request after abuse: %r" % status
    print("normal 200")


def slowloris(n):
    ctx = context()
    socks = [tls(ctx, timeout=60) for _ in range(n)]
    print("connected", len(socks), flush=True)
    start = time.monotonic()
    closed_at = [None] * n
    head = b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Slow: " + b"a" * 10000
    pos = 0
    while any(t is None for t in closed_at) and time.monotonic() - start < 40:
        for i, s in enumerate(socks):
            if closed_at[i] is not None:
                continue
            try:
                s.send(head[pos:pos + 1])
            except (OSError, ssl.SSLError):
                closed_at[i] = time.monotonic() - start
        pos = (pos + 1) % len(head)
        time.sleep(0.2)
    slowest = max(t if t is not None else 999 for t in closed_at)
    print("slowloris closed %d of %d, slowest after %.1f s" % (sum(t is not None for t in closed_at), n, slowest))


def client_hello():
    ctx = context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="a.test")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def drop(n):
    hello = client_hello()
    assert len(hello) > 100 and hello[0] == 0x16, "a ClientHello record"
    done = 0
    rng = random.Random(7)
    while done < n:
        batch = []
        for _ in range(min(200, n - done)):
            s = socket.socket()
            s.connect(("127.0.0.1", port))
            cut = rng.choice([0, 1, 5, 50, len(hello) // 2, len(hello) - 1])
            if cut:
                s.sendall(hello[:cut])
            batch.append(s)
        for s in batch:
            if rng.random() < 0.5:
                # A reset instead of an orderly close.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        done += len(batch)
    print("dropped", done)


def flood(seconds):
    ctx = context()
    stop = time.monotonic() + seconds
    done = [0]
    lock = threading.Lock()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(64)]

    def worker():
        while time.monotonic() < stop:
            try:
                s = tls(ctx, timeout=10)
                s.close()
                with lock:
                    done[0] += 1
            except OSError:
                pass

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in idle:
        s.close()
    print("flood handshakes", done[0])


def hold(n):
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    print("holding", len(socks), flush=True)
    sys.stdin.read()


if mode == "malformed":
    malformed()
elif mode == "slowloris":
    slowloris(int(sys.argv[3]))
elif mode == "drop":
    drop(int(sys.argv[3]))
elif mode == "flood":
    flood(float(sys.argv[3]))
elif mode == "hold":
    hold(int(sys.argv[3]))
else:
    sys.exit("unknown mode " + mode)
