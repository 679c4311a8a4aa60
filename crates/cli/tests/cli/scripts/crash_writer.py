# Registry writes through the admin API until the gateway goes away. Arguments: ADMIN_PORT PREFIX.
# Four threads create things PREFIX-wT-I with attributes that name themselves; each creation the
# API acknowledged (201) is printed as "ok NAME" at once. Exits when the gateway stops answering.
import http.client, json, ssl, sys, threading

port, prefix = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile="data/ca/ca.pem")
ctx.load_cert_chain("data/admin/admin.pem", "data/admin/admin.key")
lock = threading.Lock()


def writer(t):
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    i = 0
    while True:
        name = "%s-w%d-%d" % (prefix, t, i)
        body = json.dumps({"name": name, "attributes": {"check": name, "n": str(i)}})
        try:
            conn.request("POST", "/v1/things", body, {"content-type": "application/json"})
            resp = conn.getresponse()
            resp.read()
        except Exception:
            return
        if resp.status != 201:
            with lock:
                print("error", resp.status, name, flush=True)
            return
        with lock:
            print("ok", name, flush=True)
        i += 1


threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
