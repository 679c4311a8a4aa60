# An HTTP/2 upstream (h2c, prior knowledge) that refuses streams the ways RFC 9113 §8.7 says a
# client may send again, and one way it may not, to test the gateway's retries. Prints its port,
# then serves until killed. By the request's path:
#   /refuse-once/NAME   the first request for NAME: RST_STREAM REFUSED_STREAM once its body
#                       arrived (not processed); the next: answered
#   /goaway-once/NAME   the first: a GOAWAY whose last stream is below it (not processed), and
#                       the connection closed; the next: answered
#   /refuse-early/NAME  the first request for NAME: RST_STREAM REFUSED_STREAM as soon as its
#                       head arrives, while its body may still be coming (the file
#                       refused-NAME.txt then exists); the next: answered
#   /reset/NAME         RST_STREAM INTERNAL_ERROR (perhaps processed: never sent again)
#   /count/NAME         answers how many requests for NAME arrived
#   /hold/NAME          never answered (held open until the gateway resets it); each one's
#                       arrival is counted in the file held.txt
# It allows 4 streams at once on a connection (SETTINGS_MAX_CONCURRENT_STREAMS).
# An answered request gets 200 with "attempt N: " and the body it received.
import socket, sys, threading

import h2.config, h2.connection, h2.errors, h2.events, h2.exceptions, h2.settings

seen = {}
lock = threading.Lock()


def name_of(path):
    return path.split("/", 2)[2] if path.count("/") >= 2 else path


def serve(sock):
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.local_settings = h2.settings.Settings(
        client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 4})
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    requests = {}
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    headers = dict((k.decode() if isinstance(k, bytes) else k,
                                    v.decode() if isinstance(v, bytes) else v)
                                   for k, v in event.headers)
                    requests[event.stream_id] = [headers[":path"], b""]
                    path = headers[":path"]
                    if path.startswith("/refuse-early/") and not event.stream_ended:
                        name = name_of(path)
                        with lock:
                            seen[name] = seen.get(name, 0) + 1
                            first = seen[name] == 1
                        if first:
                            requests.pop(event.stream_id)
                            conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                            sock.sendall(conn.data_to_send())
                            open("refused-%s.txt" % name, "w").close()
                            continue
                    if event.stream_ended:
                        if answer(conn, sock, event.stream_id, *requests.pop(event.stream_id)):
                            return
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    if event.stream_id in requests:
                        requests[event.stream_id][1] += event.data
                    if event.stream_ended and event.stream_id in requests:
                        if answer(conn, sock, event.stream_id, *requests.pop(event.stream_id)):
                            return
                elif isinstance(event, h2.events.StreamEnded):
                    if event.stream_id in requests:
                        if answer(conn, sock, event.stream_id, *requests.pop(event.stream_id)):
                            return
            sock.sendall(conn.data_to_send())
    except (OSError, h2.exceptions.ProtocolError):
        return
    finally:
        sock.close()


def answer(conn, sock, stream_id, path, body):
    """Answers (or refuses) a whole request; true when the connection is to close."""
    kind = path.split("/")[1]
    name = name_of(path)
    with lock:
        if kind not in ("count", "refuse-early"):
            seen[name] = seen.get(name, 0) + 1
        attempt = seen.get(name, 0)
    if kind == "refuse-once" and attempt == 1:
        conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
        return False
    if kind == "goaway-once" and attempt == 1:
        conn.close_connection(h2.errors.ErrorCodes.NO_ERROR, last_stream_id=max(0, stream_id - 2))
        sock.sendall(conn.data_to_send())
        return True
    if kind == "hold":
        with lock:
            held = seen[name]
            with open("held.txt", "w") as f:
                f.write(str(held))
        return False
    if kind == "reset":
        conn.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        return False
    text = (b"%d" % attempt) if kind == "count" else b"attempt %d: " % attempt + body
    conn.send_headers(stream_id, [(":status", "200"), ("content-length", str(len(text)))])
    conn.send_data(stream_id, text, end_stream=True)
    return False


srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(64)
print(srv.getsockname()[1], flush=True)
while True:
    s, _ = srv.accept()
    threading.Thread(target=serve, args=(s,), daemon=True).start()
