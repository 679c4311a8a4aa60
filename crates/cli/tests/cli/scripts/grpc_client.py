# gRPC calls through the gateway with grpcio (PyPI) over mutual TLS: unary, server streaming,
# client streaming, bidirectional, a streaming call cancelled mid-way, a deadline exceeded, an
# upstream error's status and message, a stalled reader of a large stream (bounded memory), and
# the gateway's own refusals as gRPC statuses.
# Arguments: gateway port, CA file, client certificate chain, client key, the gateway's pid.
import sys, time

import grpc

port, ca, cert, key = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
ident = lambda b: b


def check(cond, what):
    if not cond:
        print("FAILED: " + what, flush=True)
        sys.exit(1)
    print("ok " + what, flush=True)


def channel(host, with_cert=True):
    creds = grpc.ssl_channel_credentials(
        root_certificates=open(ca, "rb").read(),
        private_key=open(key, "rb").read() if with_cert else None,
        certificate_chain=open(cert, "rb").read() if with_cert else None,
    )
    return grpc.secure_channel(
        "127.0.0.1:%s" % port,
        creds,
        options=[("grpc.ssl_target_name_override", host), ("grpc.default_authority", host)],
    )


def method(ch, name, kind="unary_unary"):
    return getattr(ch, kind)("/test.Echo/" + name, request_serializer=ident, response_deserializer=ident)


def status_of(call):
    try:
        call()
        return None, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


ch = channel("localhost")
answer = method(ch, "Echo")(b"hi", timeout=10)
check(answer.startswith(b"echo:hi|:"), "unary call answered, the certificate forwarded as client-cert metadata (%r)" % answer[:30])

answer = method(channel("tls.test"), "Echo")(b"tls", timeout=10)
check(answer.startswith(b"echo:tls|:"), "a unary call through an h2 mapping: HTTP/2 over TLS to the upstream (%r)" % answer[:20])
back = list(method(channel("tls.test"), "Chat", "stream_stream")(iter([b"a", b"b"]), timeout=10))
check(back == [b"A", b"B"], "bidirectional through the h2 mapping")

got = [m for m in method(ch, "Count", "unary_stream")(b"5", timeout=10)]
check(got == [b"n-%d" % i for i in range(5)], "server streaming: 5 messages in order")

total = method(ch, "Sum", "stream_unary")(iter([b"abc", b"de", b"f" * 10]), timeout=10)
check(total == b"15", "client streaming: the upstream read every message (%r)" % total)

back = list(method(ch, "Chat", "stream_stream")(iter([b"one", b"two", b"three"]), timeout=10))
check(back == [b"ONE", b"TWO", b"THREE"], "bidirectional: every message back")

code, details = status_of(lambda: method(ch, "Fail")(b"", timeout=10))
check(code == grpc.StatusCode.NOT_FOUND and details == "no such thing",
      "the upstream's status and message cross the gateway in trailers (%s %r)" % (code, details))

started = time.monotonic()
code, details = status_of(lambda: method(ch, "Slow")(b"", timeout=0.5))
took = time.monotonic() - started
check(code == grpc.StatusCode.DEADLINE_EXCEEDED and took < 2.5,
      "a deadline shorter than the upstream's answer: DEADLINE_EXCEEDED after %.2f s" % took)

call = method(ch, "Count", "unary_stream")(b"1000", timeout=30)
first = [next(call) for _ in range(3)]
call.cancel()
check(first == [b"n-0", b"n-1", b"n-2"], "a long stream started")
code, _ = status_of(lambda: list(call))
check(code == grpc.StatusCode.CANCELLED, "cancelled mid-way by the client (%s)" % code)

# A client that stops reading a 64 MiB stream: flow control holds the upstream back; the gateway
# keeps at most a window's worth (its resident memory, read from /proc, grows by little).
gateway_pid = int(sys.argv[5])


def rss_kib():
    for line in open("/proc/%d/status" % gateway_pid):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])


call = method(ch, "Big", "unary_stream")(b"1024", timeout=60)
next(call)
before = rss_kib()
time.sleep(2)  # not reading: everything the upstream could send meanwhile piles up somewhere
held = rss_kib() - before
rest = sum(1 for _ in call)
check(rest == 1023, "the whole 64 MiB stream arrived once the client read again (%d messages)" % (rest + 1))
check(held < 8 * 1024, "a stalled reader made the gateway hold %d KiB (bounded by the windows)" % held)
print("stalled 64 MiB stream: the gateway grew by %d KiB" % held, flush=True)

# Regression: every client's calls to an upstream share one connection. A client that opened
# 40 large streams and let nothing in (its windows at zero: a hand-written HTTP/2 client) made the
# gateway hold each stream's whole upstream window, up to the connection's 16 MiB: every other
# client's calls to that upstream then waited for it. Its streams now hold only their own windows
# (512 KiB each) and the connection's is out of reach.
import socket, ssl, struct
import h2.config, h2.connection, h2.settings

tls = ssl.create_default_context(cafile=ca)
tls.load_cert_chain(cert, key)
tls.set_alpn_protocols(["h2"])
raw = tls.wrap_socket(socket.create_connection(("127.0.0.1", int(port))), server_hostname="localhost")
check(raw.selected_alpn_protocol() == "h2", "the stalling client speaks HTTP/2")
stall = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
stall.local_settings = h2.settings.Settings(client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
stall.initiate_connection()
for i in range(40):
    sid = stall.get_next_available_stream_id()
    stall.send_headers(sid, [(":method", "POST"), (":scheme", "https"), (":authority", "localhost"),
                             (":path", "/test.Echo/Big"), ("content-type", "application/grpc"),
                             ("te", "trailers")])
    stall.send_data(sid, b"\x00" + struct.pack(">I", 3) + b"256", end_stream=True)
raw.sendall(stall.data_to_send())
before = rss_kib()
# Until the gateway holds 14 MiB more (the streams' answers piling up: at the old windows the
# connection stopped at 16; now at 40 × 512 KiB), or 10 s; what arrives is read (never
# acknowledged).
raw.settimeout(0.05)
deadline = time.monotonic() + 10
while rss_kib() - before < 14 * 1024 and time.monotonic() < deadline:
    try:
        stall.receive_data(raw.recv(65536))
        raw.sendall(stall.data_to_send())
    except socket.timeout:
        pass
grown = rss_kib() - before
check(grown >= 14 * 1024, "the 40 stalled streams' answers piled up in the gateway (%d KiB)" % grown)
other = channel("localhost")
try:
    answer = method(other, "Echo")(b"meanwhile", timeout=5)
    check(answer.startswith(b"echo:meanwhile"),
          "another client's call goes through while one client stalls 40 streams (%s)" % answer)
except grpc.RpcError as e:
    check(False, "another client's call goes through while one client stalls 40 streams "
                 "(the gateway grew by %d KiB; %s)" % (grown, e.code()))
raw.close()
print("40 stalled streams: the gateway grew by %d KiB; another call went through" % grown, flush=True)

# The gateway's own answers, as gRPC statuses a client can read.
code, details = status_of(lambda: method(channel("down.test"), "Echo")(b"", timeout=10))
check(code == grpc.StatusCode.UNAVAILABLE and "upstream-unavailable" in details,
      "an upstream down: UNAVAILABLE (%s %r)" % (code, details))
code, details = status_of(lambda: method(channel("policy.test"), "Slow")(b"", timeout=10))
check(code == grpc.StatusCode.PERMISSION_DENIED and "policy-denied" in details,
      "a method the policies do not allow: PERMISSION_DENIED (%s %r)" % (code, details))
answer = method(channel("policy.test"), "Echo")(b"ok", timeout=10)
check(answer.startswith(b"echo:ok"), "a method the policies allow by its HTTP route is called")
got = list(method(channel("policy.test"), "Count", "unary_stream")(b"2", timeout=10))
check(got == [b"n-0", b"n-1"], "a method allowed as grpc:Invoke on grpc:test.Echo/Count is called")
code, details = status_of(lambda: method(channel("policy.test"), "Fail")(b"", timeout=10))
check(code == grpc.StatusCode.PERMISSION_DENIED,
      "an explicit Deny on grpc:test.Echo/Fail wins over an Allow of its route (%s %r)" % (code, details))
code, details = status_of(lambda: method(channel("optional.test", with_cert=False), "Echo")(b"", timeout=10))
check(code == grpc.StatusCode.UNAUTHENTICATED and "no-certificate" in details,
      "no certificate on an optional domain's certificate-only mapping: UNAUTHENTICATED (%s %r)" % (code, details))
print("ALL OK", flush=True)
