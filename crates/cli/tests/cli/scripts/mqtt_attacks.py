# MQTT attacks for the attack tests, with paho-mqtt over TLS to the gateway's MQTT port (no SNI:
# the default domain). Prints one JSON object with what each client saw. Every wait is bounded.
#
#   mqtt_attacks.py takeover PORT   alice leaves a persistent session "dev" with a message queued
#                                   for her; carol resumes client id "dev": does she get it?
#   mqtt_attacks.py wildcard PORT   a client id "+" at CONNECT; a certificate whose CN is "+"
#                                   subscribing to telemetry/+/# through ${cert:Subject.CN}
import json, queue, sys, threading, uuid
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

PORT = int(sys.argv[2])
WAIT = 15


class Device:
    def __init__(self, who, client_id, clean=True):
        self.messages = queue.Queue()
        self.connected = queue.Queue()
        self.subacks = queue.Queue()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv311, clean_session=clean)
        self.c.tls_set(ca_certs="data/ca/ca.pem", certfile=who + ".chain.pem", keyfile=who + ".key")
        # The default domain's certificate names localhost; the chain is still verified.
        self.c.tls_insecure_set(True)
        self.c.on_connect = lambda c, u, flags, rc, p: self.connected.put((rc.value, flags.session_present))
        self.c.on_message = lambda c, u, m: self.messages.put(m.topic)
        self.c.on_subscribe = lambda c, u, mid, codes, p: self.subacks.put([x.value for x in codes])
        self.c.connect("127.0.0.1", PORT, keepalive=30)
        self.c.loop_start()

    def connack(self):
        try:
            return self.connected.get(timeout=WAIT)
        except queue.Empty:
            return ("none", False)

    def subscribe(self, topic):
        self.c.subscribe(topic, qos=1)
        return self.subacks.get(timeout=WAIT)

    def publish(self, topic):
        self.c.publish(topic, b"x", qos=1).wait_for_publish(WAIT)

    def next_message(self):
        try:
            return self.messages.get(timeout=WAIT)
        except queue.Empty:
            return None

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def takeover():
    publisher = Device("dave", "publisher-" + uuid.uuid4().hex[:8])
    publisher.connack()
    alice = Device("alice", "dev", clean=False)
    alice_connack = alice.connack()
    alice.subscribe("alice/#")
    alice.close()
    publisher.publish("alice/secret")
    carol = Device("carol", "dev", clean=False)
    rc, present = carol.connack()
    carol.subscribe("public/#")
    publisher.publish("public/hello")
    # Queued messages are sent first on resumption: if alice's were handed over, it is first.
    first = carol.next_message()
    carol.close()
    publisher.close()
    print(json.dumps({"alice_connack": alice_connack[0], "carol_connack": rc,
                      "carol_session_present": present, "carol_first_message": first}))


def wildcard():
    plus_id = Device("alice", "+")
    plus_id_rc = plus_id.connack()[0]
    plus_id.c.loop_stop()
    victim = Device("dev-1", "dev-1")
    victim.connack()
    attacker = Device("plus", "plus-device")
    attacker_rc = attacker.connack()[0]
    wide = attacker.subscribe("telemetry/+/#")
    own = attacker.subscribe("public/#")
    victim.publish("telemetry/dev-1/temperature")
    victim.publish("public/hello")
    first = attacker.next_message()
    attacker.close()
    victim.close()
    print(json.dumps({"plus_client_id_connack": plus_id_rc, "attacker_connack": attacker_rc,
                      "wide_suback": wide, "own_suback": own, "attacker_first_message": first}))


{"takeover": takeover, "wildcard": wildcard}[sys.argv[1]]()
