# Fleet provisioning by claim with AWS's own device SDK (awsiotsdk on awscrt, PyPI), as its
# fleet-provisioning sample does it: a device holding only the factory's claim certificate
# connects (mqtt_connection_builder.mtls_from_path), asks for its own certificate with
# CreateCertificateFromCsr (its key, from `openssl req`, never leaves it), registers it with
# RegisterThing under the template "factory", and connects with its new certificate. Then the
# same with CreateKeysAndCertificate over MQTT 5 and the SDK's request-response client
# (IotIdentityClientV2), and the refusals: a spent token, missing parameters (nothing made, the
# token still good), a disabled template, and a claim certificate publishing anywhere else; and
# the same calls on the CBOR topics.
# Arguments: the MQTT port. Files in the working directory: claim-1.chain.pem, claim-1.key,
# device.csr, device.key, data/ca/ca.pem. Exits non-zero on the first failure; prints the
# claim-to-first-connection time.
import json, queue, sys, time

from awscrt import mqtt, mqtt5, mqtt_request_response
from awsiot import iotidentity, mqtt5_client_builder, mqtt_connection_builder

port = int(sys.argv[1])
WAIT = 20
CA = "data/ca/ca.pem"


def check(cond, what):
    if not cond:
        print("FAILED: " + what, flush=True)
        sys.exit(1)
    print("ok " + what, flush=True)


def take(q, what):
    try:
        return q.get(timeout=WAIT)
    except queue.Empty:
        print("FAILED: no %s within %d s" % (what, WAIT), flush=True)
        sys.exit(1)


def connect(cert, key, client_id):
    conn = mqtt_connection_builder.mtls_from_path(
        endpoint="localhost", port=port, cert_filepath=cert, pri_key_filepath=key,
        ca_filepath=CA, client_id=client_id, clean_session=True, keep_alive_secs=30)
    conn.connect().result(WAIT)
    return conn


# --- CreateCertificateFromCsr + RegisterThing, MQTT 3.1.1, the sample's IotIdentityClient ---
started = time.monotonic()
claim = connect("claim-1.chain.pem", "claim-1.key", "factory-line-7")
check(True, "the claim certificate connected")
identity = iotidentity.IotIdentityClient(claim)
answers = queue.Queue()


def on_answer(kind):
    return lambda response: answers.put((kind, response))


def on_rejected(kind):
    return lambda error: answers.put((kind + "-rejected", error))


def subscribe(call, request, callback):
    future, _ = call(request=request, qos=mqtt.QoS.AT_LEAST_ONCE, callback=callback)
    future.result(WAIT)


subscribe(identity.subscribe_to_create_certificate_from_csr_accepted,
          iotidentity.CreateCertificateFromCsrSubscriptionRequest(), on_answer("csr"))
subscribe(identity.subscribe_to_create_certificate_from_csr_rejected,
          iotidentity.CreateCertificateFromCsrSubscriptionRequest(), on_rejected("csr"))
for template in ("factory", "retired"):
    subscribe(identity.subscribe_to_register_thing_accepted,
              iotidentity.RegisterThingSubscriptionRequest(template_name=template), on_answer("register"))
    subscribe(identity.subscribe_to_register_thing_rejected,
              iotidentity.RegisterThingSubscriptionRequest(template_name=template), on_rejected("register"))
check(True, "subscribed to the accepted and rejected topics")

csr = open("device.csr").read()
identity.publish_create_certificate_from_csr(
    request=iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csr),
    qos=mqtt.QoS.AT_LEAST_ONCE).result(WAIT)
kind, created = take(answers, "CreateCertificateFromCsr answer")
check(kind == "csr", "CreateCertificateFromCsr accepted (%s)" % kind)
check(created.certificate_pem.startswith("-----BEGIN CERTIFICATE-----") and created.certificate_id
      and created.certificate_ownership_token, "a certificate, its id and an ownership token")
open("device.pem", "w").write(created.certificate_pem)
print("certificate id " + created.certificate_id, flush=True)


def register(template, token, parameters):
    identity.publish_register_thing(
        request=iotidentity.RegisterThingRequest(
            template_name=template, certificate_ownership_token=token, parameters=parameters),
        qos=mqtt.QoS.AT_LEAST_ONCE).result(WAIT)
    return take(answers, "RegisterThing answer")


# A template's refusal makes nothing, and leaves the token good.
kind, error = register("factory", created.certificate_ownership_token, {"Model": "m2"})
check(kind == "register-rejected" and error.error_code == "InvalidParameters"
      and "SerialNumber" in error.error_message,
      "missing parameter refused: %s %s" % (getattr(error, "error_code", ""), getattr(error, "error_message", "")))
kind, error = register("retired", created.certificate_ownership_token, {"SerialNumber": "A1"})
check(kind == "register-rejected" and error.status_code == 404,
      "a disabled template refused (%s)" % getattr(error, "error_code", ""))
kind, registered = register("factory", created.certificate_ownership_token,
                            {"SerialNumber": "A1", "Model": "m2"})
check(kind == "register", "RegisterThing accepted after the refusals (%s)" % kind)
check(registered.thing_name == "sensor-A1", "the thing is named by the template: %s" % registered.thing_name)
check(registered.device_configuration == {"Fallback": "https://fallback.example"},
      "deviceConfiguration answered: %s" % registered.device_configuration)
kind, error = register("factory", created.certificate_ownership_token, {"SerialNumber": "A9"})
check(kind == "register-rejected" and error.error_code == "InvalidCertificateOwnershipToken",
      "a spent token is refused (%s)" % getattr(error, "error_code", ""))

# The device connects with its own certificate (its key never left it).
device = connect("device.pem", "device.key", "sensor-A1")
took = time.monotonic() - started
device.publish(topic="devices/sensor-A1/telemetry", payload=b"{\"t\": 21}",
               qos=mqtt.QoS.AT_LEAST_ONCE)[0].result(WAIT)
check(True, "the device published with its new certificate")
print("claim to first connection with the new certificate: %.0f ms" % (took * 1000), flush=True)

# Renewal over MQTT on the device's own connection: a new key, the same subject; no policy has
# to name these topics (a device may always renew itself).
renewed = queue.Queue()
for outcome in ("accepted", "rejected"):
    device.subscribe(topic="$portcullis/certificates/renew/json/" + outcome, qos=mqtt.QoS.AT_LEAST_ONCE,
                     callback=lambda topic, payload, o=outcome, **kw: renewed.put((o, payload)))[0].result(WAIT)
device.publish(topic="$portcullis/certificates/renew/json",
               payload=json.dumps({"certificateSigningRequest": open("renew.csr").read()}),
               qos=mqtt.QoS.AT_LEAST_ONCE)[0].result(WAIT)
outcome, payload = take(renewed, "renewal answer")
answer = json.loads(payload)
check(outcome == "accepted" and answer["certificatePem"].startswith("-----BEGIN CERTIFICATE-----"),
      "renewed over MQTT: %s %s" % (outcome, payload[:200]))
open("renewed.pem", "w").write(answer["certificatePem"])
device.disconnect().result(WAIT)
again = connect("renewed.pem", "renew.key", "sensor-A1")
again.publish(topic="devices/sensor-A1/telemetry", payload=b"{}", qos=mqtt.QoS.AT_LEAST_ONCE)[0].result(WAIT)
check(True, "the device connected and published with its renewed certificate")
again.disconnect().result(WAIT)

# The same calls on IoT Core's CBOR topics (the payloads in CBOR, answered in CBOR), with a
# few lines of CBOR here: text, unsigned integers, arrays and maps are all they use.
def cbor_head(major, n):
    if n < 24:
        return bytes([major << 5 | n])
    for info, size in ((24, 1), (25, 2), (26, 4)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | info]) + n.to_bytes(size, "big")
    raise ValueError(n)


def cbor_encode(v):
    if isinstance(v, str):
        raw = v.encode()
        return cbor_head(3, len(raw)) + raw
    if isinstance(v, dict):
        return cbor_head(5, len(v)) + b"".join(cbor_encode(k) + cbor_encode(x) for k, x in v.items())
    raise ValueError(v)


def cbor_decode(b, i=0):
    major, info = b[i] >> 5, b[i] & 31
    i += 1
    if info < 24:
        n = info
    else:
        size = {24: 1, 25: 2, 26: 4, 27: 8}[info]
        n = int.from_bytes(b[i:i + size], "big")
        i += size
    if major == 0:
        return n, i
    if major == 3:
        return b[i:i + n].decode(), i + n
    if major in (4, 5):
        items = []
        for _ in range(n * (2 if major == 5 else 1)):
            item, i = cbor_decode(b, i)
            items.append(item)
        return (dict(zip(items[::2], items[1::2])) if major == 5 else items), i
    raise ValueError("CBOR major type %d" % major)


cbor_answers = queue.Queue()
for base in ("$aws/certificates/create/cbor", "$aws/provisioning-templates/factory/provision/cbor"):
    for outcome in ("accepted", "rejected"):
        claim.subscribe(topic=base + "/" + outcome, qos=mqtt.QoS.AT_LEAST_ONCE,
                        callback=lambda topic, payload, **kw: cbor_answers.put((topic, payload)))[0].result(WAIT)
claim.publish(topic="$aws/certificates/create/cbor", payload=cbor_encode({}),
              qos=mqtt.QoS.AT_LEAST_ONCE)[0].result(WAIT)
topic, payload = take(cbor_answers, "CreateKeysAndCertificate answer in CBOR")
made_cbor, _ = cbor_decode(payload)
check(topic.endswith("/accepted") and made_cbor["certificatePem"].startswith("-----BEGIN CERTIFICATE-----")
      and made_cbor["privateKey"].startswith("-----BEGIN"),
      "CreateKeysAndCertificate on the CBOR topic, answered in CBOR (%s)" % topic)
claim.publish(topic="$aws/provisioning-templates/factory/provision/cbor",
              payload=cbor_encode({"certificateOwnershipToken": made_cbor["certificateOwnershipToken"],
                                   "parameters": {"SerialNumber": "D5"}}),
              qos=mqtt.QoS.AT_LEAST_ONCE)[0].result(WAIT)
topic, payload = take(cbor_answers, "RegisterThing answer in CBOR")
registered_cbor, _ = cbor_decode(payload)
check(topic.endswith("/accepted") and registered_cbor["thingName"] == "sensor-D5"
      and registered_cbor["deviceConfiguration"] == {"Fallback": "https://fallback.example"},
      "RegisterThing on the CBOR topic: %r" % (registered_cbor,))
claim.publish(topic="$aws/provisioning-templates/factory/provision/cbor", payload=b'{"json": "here"}',
              qos=mqtt.QoS.AT_LEAST_ONCE)[0].result(WAIT)
topic, payload = take(cbor_answers, "a refusal in CBOR")
refusal, _ = cbor_decode(payload)
check(topic.endswith("/rejected") and refusal["statusCode"] == 400 and refusal["errorCode"] == "InvalidPayload",
      "JSON on a CBOR topic is refused, in CBOR: %r" % (refusal,))

# The claim certificate may do nothing else: a publish elsewhere closes the connection (3.1.1
# cannot refuse a publish otherwise, as IoT Core does).
try:
    claim.publish(topic="devices/sensor-A1/telemetry", payload=b"x", qos=mqtt.QoS.AT_LEAST_ONCE)[0].result(5)
    refused = False
except Exception:
    refused = True
check(refused, "the claim certificate cannot publish to a device topic")
try:
    claim.disconnect().result(5)
except Exception:
    pass

# --- CreateKeysAndCertificate + RegisterThing, MQTT 5, the SDK's request-response client ---
connected = queue.Queue()
client = mqtt5_client_builder.mtls_from_path(
    endpoint="localhost", port=port, cert_filepath="claim-1.chain.pem", pri_key_filepath="claim-1.key",
    ca_filepath=CA, client_id="factory-line-8",
    on_lifecycle_connection_success=lambda data: connected.put(True))
client.start()
take(connected, "MQTT 5 connection")
rr = iotidentity.IotIdentityClientV2(client, mqtt_request_response.ClientOptions(
    max_request_response_subscriptions=2, max_streaming_subscriptions=2, operation_timeout_in_seconds=WAIT))
keys = rr.create_keys_and_certificate(iotidentity.CreateKeysAndCertificateRequest()).result(WAIT)
check(keys.private_key.startswith("-----BEGIN") and keys.certificate_pem.startswith("-----BEGIN CERTIFICATE-----"),
      "CreateKeysAndCertificate answered a key and a certificate")
open("made.pem", "w").write(keys.certificate_pem)
open("made.key", "w").write(keys.private_key)
thing = rr.register_thing(iotidentity.RegisterThingRequest(
    template_name="factory", certificate_ownership_token=keys.certificate_ownership_token,
    parameters={"SerialNumber": "B2"})).result(WAIT)
check(thing.thing_name == "sensor-B2", "RegisterThing over MQTT 5: %s" % thing.thing_name)
client.stop()

made = connect("made.pem", "made.key", "sensor-B2")
made.publish(topic="devices/sensor-B2/telemetry", payload=b"{}", qos=mqtt.QoS.AT_LEAST_ONCE)[0].result(WAIT)
check(True, "the device made with CreateKeysAndCertificate connected and published")
made.disconnect().result(WAIT)

# Regression (claim_took_over_a_device_client_id): the claim certificate may not connect with a
# provisioned thing's name as its client id (it would close that device's session).
try:
    connect("claim-1.chain.pem", "claim-1.key", "sensor-B2")
    taken = True
except Exception:
    taken = False
check(not taken, "a claim certificate cannot connect as a provisioned device")
print("ALL OK", flush=True)
