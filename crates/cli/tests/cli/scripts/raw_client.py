# Drives the gateway's HTTP/1.1 path with raw bytes over one TLS connection at a time and checks
# what comes back. Arguments: gateway port. Exits non-zero with a message on the first failure.
import socket, ssl, sys

port = int(sys.argv[1])
ctx = ssl.create_default_context(cafile="data/ca/ca.pem")
ctx.load_cert_chain("alice.chain.pem", "alice.key")
ctx.set_alpn_protocols(["http/1.1"])


def connect():
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=20), server_hostname="a.test")
    return s, s.makefile("rb")


def response(f, head=False):
    status = f.readline().decode()
    assert status.startswith("HTTP/1.1 "), "status line %r" % status
    code = int(status.split(" ")[1])
    headers = {}
    while True:
        line = f.readline().decode()
        if line in ("\r\n", ""):
            break
        k, _, v = line.partition(":")
        headers.setdefault(k.strip().lower(), []).append(v.strip())
    trailers = {}
    if head or code in (204, 304):
        body = b""
    elif "chunked" in ",".join(headers.get("transfer-encoding", [])):
        body = b""
        while True:
            size = int(f.readline().split(b";")[0], 16)
            if size == 0:
                while True:
                    line = f.readline().decode()
                    if line in ("\r\n", ""):
                        break
                    k, _, v = line.partition(":")
                    trailers[k.strip().lower()] = v.strip()
                break
            body += f.read(size)
            assert f.read(2) == b"\r\n", "chunk end"
    elif "content-length" in headers:
        body = f.read(int(headers["content-length"][0]))
    else:
        body = f.read()
    return code, headers, body, trailers


def req(method, path, extra="", body=b""):
    head = "%s %s HTTP/1.1\r\nHost: a.test\r\n%s" % (method, path, extra)
    if body:
        head += "Content-Length: %d\r\n" % len(body)
    return (head + "\r\n").encode() + body


def check(cond, what):
    if not cond:
        print("FAILED: " + what)
        sys.exit(1)
    print("ok " + what)


s, f = connect()
# Identity and forwarding headers from the client are replaced; others pass.
s.sendall(req("GET", "/raw/echo?q=1", "X-Client-Cert-Subject: CN=evil\r\nclient-cert: :ZXZpbA==:\r\n"
              "X-Forwarded-For: 10.9.8.7\r\nForwarded: for=evil\r\nX-Forwarded-Host: evil\r\n"
              "X-Custom: kept\r\nConnection: keep-alive\r\nTE: trailers\r\n"))
code, h, body, _ = response(f)
text = body.decode()
check(code == 200, "echo answers 200")
check(text.startswith("GET /echo?q=1 HTTP/1.1\n"), "prefix stripped, query kept: " + text.split("\n")[0])
check("evil" not in text, "spoofed identity and forwarding headers dropped")
check("x-custom: kept" in text.lower(), "other headers forwarded")
check("x-forwarded-for: 10.9.8.7, 127.0.0.1" in text.lower(), "X-Forwarded-For appended")
check("x-client-cert-subject: cn=alice" in text.lower(), "verified identity forwarded")
check("forwarded: for=127.0.0.1;proto=https;host=\"a.test\"" in text.lower(), "Forwarded set")
check("\nte:" not in text.lower() and "keep-alive" not in text.lower(), "hop-by-hop headers dropped")

# Pipelined requests come back in order, framings mixed.
s.sendall(req("GET", "/raw/echo?n=1") + req("GET", "/raw/chunked") + req("GET", "/raw/echo?n=2"))
c1, _, b1, _ = response(f)
c2, h2, b2, t2 = response(f)
c3, _, b3, _ = response(f)
check(b1.startswith(b"GET /echo?n=1 "), "first pipelined answer")
check(c2 == 200 and b2 == b"hello world" and t2.get("x-sum") == "11", "chunked body and trailer relayed: %r %r" % (b2, t2))
check(b3.startswith(b"GET /echo?n=2 "), "third pipelined answer")

# A body delimited by the upstream closing reaches the client chunked; the connection stays.
s.sendall(req("GET", "/raw/close"))
code, h, body, _ = response(f)
check(body == b"until-close" and "chunked" in ",".join(h.get("transfer-encoding", [])), "close-delimited body re-framed: %r" % body)
s.sendall(req("GET", "/raw/interim"))
code, h, body, _ = response(f)
check(code == 200 and body == b"ok", "interim 103 skipped, final answer relayed")
s.sendall(req("GET", "/raw/empty"))
code, h, body, _ = response(f)
check(code == 204 and h.get("x-empty") == ["yes"], "204 relayed without a body")
s.sendall(req("HEAD", "/raw/head"))
code, h, body, _ = response(f, head=True)
check(code == 200 and h.get("content-length") == ["11"], "HEAD keeps Content-Length without a body")
s.sendall(req("GET", "/raw/head"))
code, h, body, _ = response(f)
check(body == b"hello world", "the request after HEAD is read correctly")
s.sendall(req("GET", "/raw/hop"))
code, h, body, _ = response(f)
check(body == b"hop" and "x-secret" not in h and "keep-alive" not in h and h.get("x-kept") == ["k"],
      "hop-by-hop response headers and those Connection names dropped: %r" % h)
# Upstream connections that die in the pool are replaced without the client noticing.
for i in range(5):
    s.sendall(req("GET", "/raw/hangup"))
    c1, _, b1, _ = response(f)
    s.sendall(req("GET", "/raw/echo"))
    c2, _, b2, _ = response(f)
    check(c1 == 200 and c2 == 200 and b2.startswith(b"GET /echo "), "request after an upstream hang-up %d" % i)
# A small POST body goes with the head.
s.sendall(req("POST", "/raw/echo", body=b"a=1&b=2"))
code, h, body, _ = response(f)
check(body.endswith(b"\n\na=1&b=2") and b"content-length: 7" in body.lower(), "small body forwarded")
# A large body is streamed by the general path, which then keeps serving this connection.
big = b"x" * (200 * 1024)
s.sendall(req("POST", "/raw/echo", body=big))
code, h, body, _ = response(f)
check(code == 200 and body.endswith(b"\n\n" + big), "200 KiB body forwarded whole")
s.sendall(req("GET", "/raw/chunked"))
code, h, body, t = response(f)
check(body == b"hello world", "the general path serves the rest of the connection")
s.close()

# Upstream connections are pooled: 20 requests on one client connection reuse them.
s, f = connect()
s.sendall(req("GET", "/raw/stats"))
before = int(response(f)[2])
for i in range(20):
    s.sendall(req("GET", "/raw/echo"))
    response(f)
s.sendall(req("GET", "/raw/stats"))
after = int(response(f)[2])
check(after - before <= 2, "20 requests took %d new upstream connections" % (after - before))
# Connection: close from the client is honoured.
s.sendall(req("GET", "/raw/echo", "Connection: close\r\n"))
code, h, body, _ = response(f)
check(h.get("connection") == ["close"], "connection: close answered")
check(s.recv(1) == b"", "the gateway closed the connection")
s.close()

# Garbage after a good request: the general path answers 400 on the same connection.
s, f = connect()
s.sendall(req("GET", "/raw/echo") + b"NOT HTTP AT ALL\r\n\r\n")
code, h1, _, _ = response(f)
code2, _, _, _ = response(f)
check(code == 200 and code2 == 400, "garbage after a request gets 400 (%d, %d)" % (code, code2))

# The domain's response headers (HSTS, nosniff) are on every answer, once, replacing the
# upstream's; the fast path adds Date when the upstream sent none and keeps the upstream's.
HSTS = "max-age=63072000; includeSubDomains"
def security_headers(h, what):
    check(h.get("strict-transport-security") == [HSTS] and h.get("x-content-type-options") == ["nosniff"],
          "%s carries the domain's response headers once: %r" % (what, h))
    check(len(h.get("date", [])) == 1, "%s carries one Date: %r" % (what, h.get("date")))
security_headers(h1, "a proxied answer (fast path)")
s, f = connect()
s.sendall(req("GET", "/raw/own-headers"))
code, h, body, _ = response(f)
security_headers(h, "an answer with the upstream's own HSTS")
check(h["date"] == ["Sun, 06 Nov 1994 08:49:37 GMT"], "the upstream's Date is kept: %r" % h["date"])
s.sendall(req("GET", "/dead/x"))
code, h, body, _ = response(f)
check(code == 502, "an unreachable upstream gets 502 (%d)" % code)
security_headers(h, "a gateway-made 502 (fast path)")
s.sendall(req("POST", "/raw/echo", body=big))
code, h, body, _ = response(f)
security_headers(h, "a streamed answer (general path)")
s.sendall(b"GET /raw/echo HTTP/1.1\r\nHost: elsewhere.test\r\n\r\n")
code, h, body, _ = response(f)
check(code == 421, "a Host of another domain gets 421 (%d)" % code)
security_headers(h, "a gateway-made 421 (general path)")
s.close()
print("ALL OK")
