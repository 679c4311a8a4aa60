# Verifies a token from the gateway's builtin:token with PyJWT (PyPI) against the JWKS the
# gateway serves: ES256 signature, audience, issuer, expiry, the certificate binding
# (cnf.x5t#S256, RFC 8705) and the thing's claims; a wrong audience must fail.
# Arguments: token file, JWKS file, the client certificate (PEM), expected issuer, audience,
# thing name. Exits non-zero on the first failure.
import base64, hashlib, json, sys

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

token = open(sys.argv[1]).read().strip()
jwks = json.load(open(sys.argv[2]))
cert = x509.load_pem_x509_certificate(open(sys.argv[3], "rb").read())
issuer, audience, thing = sys.argv[4], sys.argv[5], sys.argv[6]


def check(cond, what):
    if not cond:
        print("FAILED: " + what, flush=True)
        sys.exit(1)
    print("ok " + what, flush=True)


header = jwt.get_unverified_header(token)
keys = jwt.PyJWKSet.from_dict(jwks)
key = keys[header["kid"]]
claims = jwt.decode(token, key.key, algorithms=["ES256"], audience=audience, issuer=issuer,
                    options={"require": ["exp", "iat", "nbf", "jti", "sub"]})
check(header["alg"] == "ES256", "ES256, verified against the JWKS (kid %s)" % header["kid"])
check(claims["sub"] == thing, "the subject is the thing: %s" % claims["sub"])
check(claims["attributes"].get("site") == "berlin", "the thing's attributes: %s" % claims["attributes"])
check(0 < claims["exp"] - claims["iat"] <= 120, "short-lived: %d s" % (claims["exp"] - claims["iat"]))
thumb = base64.urlsafe_b64encode(hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()).rstrip(b"=").decode()
check(claims["cnf"]["x5t#S256"] == thumb, "bound to the certificate (x5t#S256)")
try:
    jwt.decode(token, key.key, algorithms=["ES256"], audience="https://other.example.com")
    check(False, "a wrong audience is refused")
except jwt.InvalidAudienceError:
    check(True, "a wrong audience is refused")
tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
try:
    jwt.decode(tampered, key.key, algorithms=["ES256"], audience=audience)
    check(False, "a tampered token is refused")
except jwt.InvalidSignatureError:
    check(True, "a tampered token is refused")
print("ALL OK", flush=True)
