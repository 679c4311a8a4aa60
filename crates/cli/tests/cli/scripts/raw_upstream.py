# A scripted HTTP/1.1 upstream for the proxy tests: each path answers with one framing or quirk.
# Prints its port, then serves until killed.
import socket, sys, threading

srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(128)
print(srv.getsockname()[1], flush=True)
accepted = 0
lock = threading.Lock()


def read_request(f):
    line = f.readline()
    if not line:
        return None
    headers = []
    while True:
        h = f.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        headers.append(h.decode("latin-1").rstrip("\r\n"))
    length = 0
    for h in headers:
        k, _, v = h.partition(":")
        if k.strip().lower() == "content-length":
            length = int(v)
    body = f.read(length) if length else b""
    return line.decode("latin-1").rstrip("\r\n"), headers, body


def handle(conn):
    f = conn.makefile("rb")
    while True:
        req = read_request(f)
        if req is None:
            break
        line, headers, body = req
        method, target, _ = line.split(" ")
        path = target.split("?")[0]
        if path == "/echo":
            text = ("\n".join([line] + headers) + "\n\n").encode() + body
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(text) + text)
        elif path == "/chunked":
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n5\r\nhel")
            conn.sendall(b"lo\r\n6;ext=1\r\n world\r\n0\r\nx-sum: 11\r\n\r\n")
        elif path == "/close":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil-")
            conn.sendall(b"close")
            conn.close()
            return
        elif path == "/interim":
            conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        elif path == "/empty":
            conn.sendall(b"HTTP/1.1 204 No Content\r\nX-Empty: yes\r\n\r\n")
        elif path == "/head":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n" + (b"" if method == "HEAD" else b"hello world"))
        elif path == "/hop":
            conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close, X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\nX-Kept: k\r\nContent-Length: 3\r\n\r\nhop")
            conn.close()
            return
        elif path == "/hangup":
            # Answers as if keeping the connection, then drops it: the pooled connection is dead.
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            conn.close()
            return
        elif path == "/own-headers":
            # An upstream that sends its own Date and Strict-Transport-Security.
            conn.sendall(b"HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
                         b"Strict-Transport-Security: max-age=1\r\nContent-Length: 3\r\n\r\nown")
        elif path == "/stats":
            with lock:
                text = str(accepted).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(text) + text)
        else:
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    conn.close()


while True:
    c, _ = srv.accept()
    with lock:
        accepted += 1
    threading.Thread(target=handle, args=(c,), daemon=True).start()
