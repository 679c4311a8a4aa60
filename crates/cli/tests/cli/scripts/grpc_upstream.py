# A gRPC server (grpcio, PyPI) speaking h2c, with generic handlers on raw bytes (no protobuf):
#   /test.Echo/Echo    unary: "echo:" + request + "|" + the client-cert metadata it received
#   /test.Echo/Slow    unary: answers after 3 s
#   /test.Echo/Fail    unary: aborts NOT_FOUND "no such thing"
#   /test.Echo/Count   server streaming: N messages ("n-0"…), 20 ms apart, until cancelled
#   /test.Echo/Big     server streaming: N messages of 64 KiB, as fast as flow control allows
#   /test.Echo/Sum     client streaming: the total length of what it was sent
#   /test.Echo/Chat    bidirectional: every message back, upper-cased
# Without arguments it serves h2c; with KEY CHAIN, TLS (ALPN h2). Prints its port once serving;
# runs until killed.
import sys, threading, time
from concurrent import futures

import grpc


def echo(request, context):
    md = dict(context.invocation_metadata())
    cert = md.get("client-cert", "")
    return b"echo:" + request + b"|" + cert.encode()[:40]


def slow(request, context):
    time.sleep(3)
    return b"late"


def fail(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")


def count(request, context):
    n = int(request.decode() or "0")
    for i in range(n):
        if not context.is_active():
            break
        yield b"n-%d" % i
        time.sleep(0.02)


def big(request, context):
    chunk = b"x" * 65536
    for _ in range(int(request.decode() or "0")):
        if not context.is_active():
            break
        yield chunk


def total(requests, context):
    return str(sum(len(r) for r in requests)).encode()


def chat(requests, context):
    for r in requests:
        yield r.upper()


ident = lambda b: b
handlers = {
    "Echo": grpc.unary_unary_rpc_method_handler(echo, ident, ident),
    "Slow": grpc.unary_unary_rpc_method_handler(slow, ident, ident),
    "Fail": grpc.unary_unary_rpc_method_handler(fail, ident, ident),
    "Count": grpc.unary_stream_rpc_method_handler(count, ident, ident),
    "Big": grpc.unary_stream_rpc_method_handler(big, ident, ident),
    "Sum": grpc.stream_unary_rpc_method_handler(total, ident, ident),
    "Chat": grpc.stream_stream_rpc_method_handler(chat, ident, ident),
}
# Threads enough for the stalled streams of the client test (each holds one while it waits).
server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
if len(sys.argv) > 2:
    # TLS (for an h2 mapping): certificate chain and key files.
    creds = grpc.ssl_server_credentials([(open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read())])
    port = server.add_secure_port("127.0.0.1:0", creds)
else:
    port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
