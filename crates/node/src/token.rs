//! Certificate → short-lived token: a client authenticated by its certificate gets an ES256 JWT
//! (IoT Core's credentials provider and SPIFFE JWT-SVIDs do this), verifiable with the JWKS every
//! node serves.
//!
//! The signing key is the same on every node: derived from the cluster key (HKDF, label
//! `portcullis token signing v1`) in a cluster; without one, made once and kept in the data
//! directory (`token/signing.key`, 0600). Tokens are bound to the certificate (`cnf.x5t#S256`,
//! RFC 8705) and carry its thing; a revoked certificate never reaches the endpoint, so
//! revocation stops new tokens at once.

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

/// The longest lifetime a token may ask for.
pub(crate) const MAX_LIFETIME_SECS: u64 = 3600;

/// What signs tokens, and its public half as a JWK.
#[derive(Debug)]
pub(crate) struct TokenSigner {
    key: EcdsaKeyPair,
    kid: String,
    jwk: Value,
}

impl TokenSigner {
    /// The signer of a cluster: the key derived from the cluster key.
    pub(crate) fn from_cluster_key(
        key: &portcullis_registry::sealed::ClusterKey,
    ) -> anyhow::Result<TokenSigner> {
        // A derived scalar is a valid P-256 key unless it is 0 or ≥ n (about 2^-32): the next
        // label then.
        for attempt in 0..8 {
            let scalar = key.derive(&format!("portcullis token signing v1/{attempt}"))?;
            if let Ok(pair) =
                EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, &sec1(&scalar))
            {
                return Ok(TokenSigner::new(pair));
            }
        }
        anyhow::bail!("cannot derive a token signing key from the cluster key")
    }

    /// The signer of a single node: `token/signing.key` in the data directory, made once.
    pub(crate) fn from_data_dir(root: &std::path::Path) -> anyhow::Result<TokenSigner> {
        use anyhow::Context as _;
        let path = root.join("token/signing.key");
        let der = match std::fs::read(&path) {
            Ok(der) => der,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let doc = EcdsaKeyPair::generate_pkcs8(
                    &ECDSA_P256_SHA256_FIXED_SIGNING,
                    &aws_lc_rs::rand::SystemRandom::new(),
                )
                .map_err(|_| anyhow::anyhow!("cannot make a token signing key"))?;
                let mut out = crate::output::Outputs::default();
                out.secret(&path, doc.as_ref().to_vec());
                out.write(false)?;
                doc.as_ref().to_vec()
            }
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", path.display()));
            }
        };
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der)
            .map_err(|e| anyhow::anyhow!("{}: not a P-256 key ({e})", path.display()))?;
        Ok(TokenSigner::new(pair))
    }

    fn new(key: EcdsaKeyPair) -> TokenSigner {
        let public = key.public_key().as_ref().to_vec();
        let thumb = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &public);
        let kid = URL_SAFE_NO_PAD.encode(&thumb.as_ref()[..12]);
        // Uncompressed point: 0x04 ‖ X ‖ Y.
        let (x, y) = public
            .get(1..)
            .unwrap_or_default()
            .split_at(32.min(public.len().saturating_sub(1)));
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
        });
        TokenSigner { key, kid, jwk }
    }

    /// The JWKS devices' relying parties verify tokens with.
    pub(crate) fn jwks(&self) -> Value {
        json!({ "keys": [self.jwk] })
    }

    /// A signed JWT with `claims` (`iat`, `nbf`, `exp` and `jti` added).
    pub(crate) fn sign(&self, mut claims: Value, lifetime_secs: u64) -> anyhow::Result<String> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let lifetime = i64::try_from(lifetime_secs.min(MAX_LIFETIME_SECS)).unwrap_or(300);
        let mut jti = [0u8; 16];
        aws_lc_rs::rand::fill(&mut jti).map_err(|_| anyhow::anyhow!("no randomness"))?;
        claims["iat"] = json!(now);
        claims["nbf"] = json!(now);
        claims["exp"] = json!(now + lifetime);
        claims["jti"] = json!(URL_SAFE_NO_PAD.encode(jti));
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": self.kid});
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self
            .key
            .sign(
                &aws_lc_rs::rand::SystemRandom::new(),
                signing_input.as_bytes(),
            )
            .map_err(|_| anyhow::anyhow!("signing a token failed"))?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        ))
    }
}

/// An RFC 5915 ECPrivateKey (P-256) holding `scalar`.
fn sec1(scalar: &[u8; 32]) -> Vec<u8> {
    // SEQUENCE { INTEGER 1, OCTET STRING scalar, [0] { OID prime256v1 } }
    let mut der = vec![0x30, 0x31, 0x02, 0x01, 0x01, 0x04, 0x20];
    der.extend_from_slice(scalar);
    der.extend_from_slice(&[
        0xa0, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ]);
    der
}

/// The base64url SHA-256 of a certificate's DER (RFC 8705's `x5t#S256`).
pub(crate) fn thumbprint(der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_derived_signer_is_the_same_on_every_node_and_signs_verifiable_tokens() {
        let text = portcullis_registry::sealed::ClusterKey::generate().unwrap();
        let a = portcullis_registry::sealed::ClusterKey::parse(&text).unwrap();
        let b = portcullis_registry::sealed::ClusterKey::parse(&text).unwrap();
        let (sa, sb) = (
            TokenSigner::from_cluster_key(&a).unwrap(),
            TokenSigner::from_cluster_key(&b).unwrap(),
        );
        assert_eq!(sa.jwks(), sb.jwks());
        let token = sa.sign(json!({"sub": "x", "aud": "y"}), 60).unwrap();
        let (input, sig) = token.rsplit_once('.').unwrap();
        let public = aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
            sb.key.public_key().as_ref(),
        );
        public
            .verify(input.as_bytes(), &URL_SAFE_NO_PAD.decode(sig).unwrap())
            .unwrap();
    }
}
