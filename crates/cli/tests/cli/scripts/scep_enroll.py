"""SCEP enrollment (RFC 8894) with pyscep, a real SCEP client, against a builtin:scep mapping.

usage: scep_enroll.py PROFILE OUT_DIR

PROFILE is the Apple .mobileconfig Portcullis made for the device: its SCEP payload gives the
URL, the subject and the one-time challenge, its root payload the CA that verifies the gateway.
The device makes its own RSA key (it never leaves), asks with a wrong challenge (refused:
badRequest), then with the one-time challenge (issued), asks again in the same transaction
(the same certificate back), polls (the same), renews with a new key signed by the issued
certificate (RenewalReq, built by pyscep's own message builder), and shows that the spent
challenge enrolls no other key. Writes OUT_DIR/scep.pem, scep.key, renewed.pem, renewed.key.
Prints ALL OK at the end.
"""

import base64
import os
import plistlib
import sys


def check(cond, what):
    if not cond:
        print("FAIL:", what, flush=True)
        sys.exit(1)
    print("ok:", what, flush=True)


profile_path, out = sys.argv[1:3]
with open(profile_path, "rb") as f:
    profile = plistlib.load(f)
payloads = {p["PayloadType"]: p for p in profile["PayloadContent"]}
scep_payload = payloads["com.apple.security.scep"]["PayloadContent"]
url = scep_payload["URL"]
challenge = scep_payload["Challenge"]
device_cn = scep_payload["Subject"][0][0][1]
ca_pem = os.path.join(out, "profile-ca.pem")
with open(ca_pem, "w") as f:
    b64 = base64.b64encode(payloads["com.apple.security.root"]["PayloadContent"]).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    f.write("-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n")
# pyscep uses requests: HTTPS is verified against the profile's CA.
os.environ["REQUESTS_CA_BUNDLE"] = ca_pem

from scep import Client  # noqa: E402
from scep.Client import CACaps, PKIStatus  # noqa: E402
from scep.Client.cryptoutils import hex_digest_for_data  # noqa: E402
from scep.Client.enums import MessageType  # noqa: E402
from scep.Client.envelope import PKCSPKIEnvelopeBuilder  # noqa: E402

USAGE = {"digital_signature", "key_encipherment"}

check(
    scep_payload["Key Type"] == "RSA" and scep_payload["KeyIsExtractable"] is False,
    "the profile's SCEP payload: an RSA key made on the device, never extractable",
)
check(device_cn == "scep-device-1" and len(challenge) > 16, "the profile names the device and a challenge")

client = Client.Client(url)
caps = client.get_ca_capabilities()
check(caps.contains(CACaps.AES) and caps.is_post_supported(), "GetCACaps offers AES and POST")
check(caps.strongest_message_digest() == "sha512", "GetCACaps offers SHA-512")
check(caps.is_renewal_supported(), "GetCACaps offers Renewal")
cas = client.get_ca_certs()  # pyscep checks the RA certificates are the CA's
check(
    cas.recipient is not None and cas.signer is not None and not cas.recipient.is_ca,
    "GetCACert: an RA to encrypt to and one that signs",
)

identity, key = Client.SigningRequest.generate_self_signed(cn=device_cn, key_usage=USAGE)

# A wrong challenge: refused, nothing issued.
csr, _ = Client.SigningRequest.generate_csr(
    cn=device_cn, key_usage=USAGE, password="not-the-code", private_key=key
)
res = client.enrol(csr=csr, identity=identity, identity_private_key=key)
check(res.status == PKIStatus.FAILURE and str(res.fail_info) == "2", "a wrong challenge: FAILURE badRequest")

# The one-time challenge: the certificate, encrypted to the device's key.
csr, _ = Client.SigningRequest.generate_csr(
    cn=device_cn, key_usage=USAGE, password=challenge, private_key=key
)
res = client.enrol(csr=csr, identity=identity, identity_private_key=key)
check(res.status == PKIStatus.SUCCESS, "PKCSReq with the challenge: SUCCESS")
issued = res.certificates[0]
check(issued.subject.native["common_name"] == "scep-device-1", "the certificate is the device's")
check(
    issued.public_key.to_der() == key.public_key.to_der(),
    "the certificate is for the key the device made",
)
with open(os.path.join(out, "scep.pem"), "wb") as f:
    f.write(issued.to_pem())
with open(os.path.join(out, "scep.key"), "wb") as f:
    f.write(key.to_pem())

# The same request again (a lost answer): the same certificate, the code is not needed twice.
again = client.enrol(csr=csr, identity=identity, identity_private_key=key)
check(
    again.status == PKIStatus.SUCCESS
    and again.certificates[0].serial_number == issued.serial_number,
    "the same transaction again: the same certificate",
)
# CertPoll for the transaction.
transaction = hex_digest_for_data(data=csr.public_key.to_der(), algorithm="sha1")
polled = client.poll(
    identity=identity,
    identity_private_key=key,
    subject=identity.subject,
    transaction_id=transaction,
)
check(
    polled.status == PKIStatus.SUCCESS
    and polled.certificates[0].serial_number == issued.serial_number,
    "CertPoll: the same certificate",
)

# The spent challenge enrolls no other key.
other, other_key = Client.SigningRequest.generate_self_signed(cn="scep-device-2", key_usage=USAGE)
csr2, _ = Client.SigningRequest.generate_csr(
    cn="scep-device-2", key_usage=USAGE, password=challenge, private_key=other_key
)
res = client.enrol(csr=csr2, identity=other, identity_private_key=other_key)
check(res.status == PKIStatus.FAILURE, "the spent challenge with another key: FAILURE")

# Renewal with a new key: RenewalReq signed with the issued certificate and its key.
new_key = Client.SigningRequest.generate_pair()
csr3, _ = Client.SigningRequest.generate_csr(
    cn=device_cn, key_usage=USAGE, private_key=new_key
)
envelope = PKCSPKIEnvelopeBuilder().encrypt(csr3.to_der(), caps.strongest_cipher())
renewal_transaction = hex_digest_for_data(data=csr3.public_key.to_der(), algorithm="sha1")
renewed = client._pki_operation(
    identity=issued,
    identity_private_key=key,
    envelope=envelope,
    message_type=MessageType.RenewalReq,
    cacaps=caps,
    ca_certs=cas,
    transaction_id=renewal_transaction,
)
check(renewed.status == PKIStatus.SUCCESS, "RenewalReq signed by the issued certificate: SUCCESS")
# pyscep unpacks certificates for PKCSReq, GetCert and CertPoll only: poll the renewal.
renewed = client.poll(
    identity=issued,
    identity_private_key=key,
    subject=issued.subject,
    transaction_id=renewal_transaction,
)
check(
    renewed.status == PKIStatus.SUCCESS
    and renewed.certificates[0].public_key.to_der() == new_key.public_key.to_der()
    and renewed.certificates[0].serial_number != issued.serial_number,
    "the renewal is a new certificate for the new key",
)
with open(os.path.join(out, "renewed.pem"), "wb") as f:
    f.write(renewed.certificates[0].to_pem())
with open(os.path.join(out, "renewed.key"), "wb") as f:
    f.write(new_key.to_pem())

# A renewal signed by a key the registry does not know: refused.
res = client._pki_operation(
    identity=other,
    identity_private_key=other_key,
    envelope=PKCSPKIEnvelopeBuilder().encrypt(csr3.to_der(), caps.strongest_cipher()),
    message_type=MessageType.RenewalReq,
    cacaps=caps,
    ca_certs=cas,
    transaction_id="renewal-by-a-stranger",
)
check(res.status == PKIStatus.FAILURE, "a renewal signed by an unregistered certificate: FAILURE")
print("ALL OK", flush=True)
