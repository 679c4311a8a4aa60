# MQTT for a certificate in its grace period (expired, its template lets it renew), with Python
# paho-mqtt: another client's id is refused at CONNECT; as its own thing it connects, may not
# publish or subscribe anywhere (PUBACK and SUBACK 0x87), and renews itself on the renewal topics.
# Arguments: MQTT port, certificate, key, CSR (PEM, same subject, a new key). Writes renewed.pem.
import json, queue, sys

import paho.mqtt.client as mqtt

port, cert, key, csr = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
WAIT = 20
RENEW = "$portcullis/certificates/renew/json"


def check(cond, what):
    if not cond:
        print("FAILED: " + what, flush=True)
        sys.exit(1)
    print("ok " + what, flush=True)


def client(client_id):
    events = {k: queue.Queue() for k in ("connack", "message", "puback", "suback")}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs="data/ca/ca.pem", certfile=cert, keyfile=key)
    c.on_connect = lambda cl, ud, flags, rc, props: events["connack"].put(rc.value)
    c.on_message = lambda cl, ud, msg: events["message"].put((msg.topic, msg.payload))
    c.on_publish = lambda cl, ud, mid, rc, props: events["puback"].put(rc.value)
    c.on_subscribe = lambda cl, ud, mid, rcs, props: events["suback"].put([r.value for r in rcs])
    c.connect("localhost", port, keepalive=30)
    c.loop_start()

    def next_event(kind):
        try:
            return events[kind].get(timeout=WAIT)
        except queue.Empty:
            print("FAILED: no %s within %d s" % (kind, WAIT), flush=True)
            sys.exit(1)

    return c, next_event


c, ev = client("someone-else")
check(ev("connack") == 0x87, "another client's id is refused at CONNECT")
c.loop_stop()

c, ev = client("late-4")
check(ev("connack") == 0, "connected as its own thing")
c.publish("devices/late-4/telemetry", b"{}", qos=1)
check(ev("puback") == 0x87, "a publication anywhere else is refused (PUBACK 0x87)")
c.subscribe("devices/#", qos=1)
check(ev("suback") == [0x87], "a subscription anywhere else is refused (SUBACK 0x87)")
c.subscribe([(RENEW + "/accepted", 1), (RENEW + "/rejected", 1)])
check(ev("suback") == [1, 1], "the renewal replies may be subscribed")
c.publish(RENEW, json.dumps({"certificateSigningRequest": open(csr).read()}), qos=1)
check(ev("puback") == 0, "the renewal request is accepted for delivery")
topic, payload = ev("message")
answer = json.loads(payload)
check(topic == RENEW + "/accepted" and answer["certificatePem"].startswith("-----BEGIN CERTIFICATE-----"),
      "renewed over MQTT: %s %s" % (topic, payload[:200]))
open("renewed.pem", "w").write(answer["certificatePem"])
c.disconnect()
c.loop_stop()
print("ALL OK", flush=True)
