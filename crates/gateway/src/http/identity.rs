//! Identity headers: the verified client certificate, forwarded upstream; never trusted from the
//! client.
//!
//! Invariant: identity headers are built only from the connection's verdict; every inbound copy
//! (any header whose name starts with one of [`RESERVED_PREFIXES`] — every profile's headers,
//! whichever profile is configured — or is one of the configured names) is removed before
//! routing, in every mode.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue};

use crate::GatewayError;
use crate::verdict::ClientVerdict;

/// Header name prefixes that only the gateway may set, whatever the configuration: every
/// profile's headers, whichever profile is chosen (an upstream moved from ALB or Traefik may still
/// read theirs).
const RESERVED_PREFIXES: [&str; 6] = [
    "client-cert",
    "x-client-cert",
    "x-forwarded-client-cert",
    "x-amzn-mtls-clientcert",
    "cloudfront-viewer-cert",
    "x-forwarded-tls-client-cert",
];

/// Which product's identity headers the upstream gets (`[identity] profile`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Profile {
    /// RFC 9440 `Client-Cert` / `Client-Cert-Chain` and the `X-Client-Cert-*` fields (renamable).
    #[default]
    Rfc9440,
    /// AWS ALB's mutual TLS headers: `X-Amzn-Mtls-Clientcert` (the chain) and
    /// `X-Amzn-Mtls-Clientcert-{Serial-Number,Issuer,Subject,Validity,Leaf}`.
    Alb,
    /// Amazon CloudFront's viewer mTLS headers: `CloudFront-Viewer-Cert-*` and `Client-Cert`.
    Cloudfront,
    /// Envoy's `x-forwarded-client-cert`.
    Envoy,
    /// Traefik's `X-Forwarded-Tls-Client-Cert` (passTLSClientCert with `pem`).
    Traefik,
}

impl Profile {
    /// Parses a configuration value.
    pub fn parse(name: &str) -> Result<Profile, GatewayError> {
        Ok(match name {
            "rfc9440" => Profile::Rfc9440,
            "alb" => Profile::Alb,
            "cloudfront" => Profile::Cloudfront,
            "envoy" => Profile::Envoy,
            "traefik" => Profile::Traefik,
            other => {
                return Err(GatewayError::Config(format!(
                    "unknown identity profile '{other}'; use rfc9440, alb, cloudfront, envoy or traefik"
                )));
            }
        })
    }
}

/// Which identity headers are sent, under which names.
#[derive(Debug, Clone)]
pub struct IdentityHeaders {
    /// RFC 9440 `Client-Cert`.
    pub client_cert: HeaderName,
    /// RFC 9440 `Client-Cert-Chain`.
    pub client_cert_chain: HeaderName,
    /// Subject, RFC 4514.
    pub subject: HeaderName,
    /// Issuer, RFC 4514.
    pub issuer: HeaderName,
    /// Serial, colon hex.
    pub serial: HeaderName,
    /// notBefore, RFC 3339.
    pub not_before: HeaderName,
    /// notAfter, RFC 3339.
    pub not_after: HeaderName,
    /// SHA-256 fingerprint, hex.
    pub fingerprint: HeaderName,
    /// `SUCCESS`, `NONE` or `FAILED:<reason>`.
    pub verify: HeaderName,
    /// Also send Envoy's `x-forwarded-client-cert`.
    pub xfcc: bool,
    /// Whose headers: RFC 9440 and the names above, or another product's fixed set.
    pub profile: Profile,
}

impl Default for IdentityHeaders {
    fn default() -> Self {
        IdentityHeaders {
            client_cert: HeaderName::from_static("client-cert"),
            client_cert_chain: HeaderName::from_static("client-cert-chain"),
            subject: HeaderName::from_static("x-client-cert-subject"),
            issuer: HeaderName::from_static("x-client-cert-issuer"),
            serial: HeaderName::from_static("x-client-cert-serial"),
            not_before: HeaderName::from_static("x-client-cert-not-before"),
            not_after: HeaderName::from_static("x-client-cert-not-after"),
            fingerprint: HeaderName::from_static("x-client-cert-fingerprint-sha256"),
            verify: HeaderName::from_static("x-client-cert-verify"),
            xfcc: false,
            profile: Profile::Rfc9440,
        }
    }
}

impl IdentityHeaders {
    /// Renames one header (`field` as in the configuration: `client_cert`, `subject`…).
    pub fn rename(&mut self, field: &str, name: &str) -> Result<(), GatewayError> {
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            GatewayError::Config(format!(
                "identity header name '{name}' is not a valid header name"
            ))
        })?;
        let hop = [
            "connection",
            "host",
            "te",
            "transfer-encoding",
            "upgrade",
            "content-length",
        ];
        if hop.contains(&header.as_str()) {
            return Err(GatewayError::Config(format!(
                "identity header name '{name}' is reserved by HTTP"
            )));
        }
        let slot = match field {
            "client_cert" => &mut self.client_cert,
            "client_cert_chain" => &mut self.client_cert_chain,
            "subject" => &mut self.subject,
            "issuer" => &mut self.issuer,
            "serial" => &mut self.serial,
            "not_before" => &mut self.not_before,
            "not_after" => &mut self.not_after,
            "fingerprint" => &mut self.fingerprint,
            "verify" => &mut self.verify,
            other => {
                return Err(GatewayError::Config(format!(
                    "unknown identity header '{other}'; use client_cert, client_cert_chain, subject, issuer, serial, not_before, not_after, fingerprint or verify"
                )));
            }
        };
        *slot = header;
        Ok(())
    }

    fn names(&self) -> [&HeaderName; 9] {
        [
            &self.client_cert,
            &self.client_cert_chain,
            &self.subject,
            &self.issuer,
            &self.serial,
            &self.not_before,
            &self.not_after,
            &self.fingerprint,
            &self.verify,
        ]
    }

    /// Whether a header of this name (any case) is an identity header: configured, or with a
    /// reserved prefix.
    pub(crate) fn is_identity_name(&self, name: &str) -> bool {
        RESERVED_PREFIXES.iter().any(|p| {
            name.len() >= p.len() && name.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
        }) || self
            .names()
            .iter()
            .any(|n| n.as_str().eq_ignore_ascii_case(name))
    }

    /// The identity headers for `verdict`: the certificate fields when verified, the verify status
    /// always. Computed once per connection; each request gets copies (`HeaderValue` clones share
    /// their bytes).
    pub(crate) fn values(&self, verdict: &ClientVerdict) -> HeaderMap {
        let mut headers = HeaderMap::new();
        self.add(&mut headers, verdict);
        headers
    }

    /// The identity headers for `verdict` as one block, held for the connection's life.
    pub(crate) fn block(&self, verdict: &ClientVerdict) -> IdentityBlock {
        IdentityBlock::of(&self.values(verdict))
    }

    /// Adds the identity headers for `verdict` to `headers`.
    pub(crate) fn add(&self, headers: &mut HeaderMap, verdict: &ClientVerdict) {
        if self.profile != Profile::Rfc9440 {
            if let ClientVerdict::Valid(chain) = verdict
                && !chain.is_empty()
            {
                product_headers(self.profile, headers, chain);
            } else if self.profile == Profile::Cloudfront {
                set(
                    headers,
                    &HeaderName::from_static("cloudfront-viewer-cert-present"),
                    "0",
                );
            }
            set(headers, &self.verify, &verdict.status());
            return;
        }
        if let ClientVerdict::Valid(chain) = verdict
            && let Some(leaf) = chain.first()
        {
            let info = leaf.info();
            set(headers, &self.client_cert, &sf_binary(leaf.der()));
            if chain.len() > 1 {
                let rest: Vec<String> = chain[1..].iter().map(|c| sf_binary(c.der())).collect();
                set(headers, &self.client_cert_chain, &rest.join(", "));
            }
            set(headers, &self.subject, &info.subject);
            set(headers, &self.issuer, &info.issuer);
            set(headers, &self.serial, &info.serial);
            set(headers, &self.not_before, &info.not_before);
            set(headers, &self.not_after, &info.not_after);
            set(headers, &self.fingerprint, &info.id);
            if self.xfcc {
                set(
                    headers,
                    &HeaderName::from_static("x-forwarded-client-cert"),
                    &xfcc(chain),
                );
            }
        }
        set(headers, &self.verify, &verdict.status());
    }
}

/// A connection's identity headers, built once after the handshake: the HTTP/1.1 header lines
/// (which the fast path copies into each request head) and each header as a name and a value
/// whose bytes are a slice of those lines (which hyper's requests get as cheap clones, with no
/// copy and no re-validation). One allocation for the values instead of a header map and a copy.
#[derive(Debug, Default)]
pub(crate) struct IdentityBlock {
    lines: bytes::Bytes,
    fields: Box<[(HeaderName, HeaderValue)]>,
}

impl IdentityBlock {
    fn of(headers: &HeaderMap) -> IdentityBlock {
        let size: usize = headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum();
        let mut lines = Vec::with_capacity(size);
        let mut ranges = Vec::with_capacity(headers.len());
        for (name, value) in headers {
            lines.extend_from_slice(name.as_str().as_bytes());
            lines.extend_from_slice(b": ");
            let start = lines.len();
            lines.extend_from_slice(value.as_bytes());
            ranges.push((name.clone(), start..lines.len()));
            lines.extend_from_slice(b"\r\n");
        }
        let lines = bytes::Bytes::from(lines);
        let fields = ranges
            .into_iter()
            .filter_map(|(name, range)| {
                // Valid header values when the map held them; checked once here.
                let value = HeaderValue::from_maybe_shared(lines.slice(range)).ok()?;
                Some((name, value))
            })
            .collect();
        IdentityBlock { lines, fields }
    }

    /// The headers as HTTP/1.1 lines, each ending in CRLF.
    pub(crate) fn lines(&self) -> &[u8] {
        &self.lines
    }

    /// Sets each identity header in `headers` (replacing any of the same name).
    pub(crate) fn insert_into(&self, headers: &mut HeaderMap) {
        // Room for all at once, not a growth (and rehash) as they arrive.
        headers.reserve(self.fields.len());
        for (name, value) in self.fields.iter() {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// Another product's identity headers for a verified chain (leaf first), in the formats its
/// documentation gives.
fn product_headers(
    profile: Profile,
    headers: &mut HeaderMap,
    chain: &[portcullis_pki::Certificate],
) {
    let leaf = &chain[0];
    let info = leaf.info();
    let validity = format!("NotBefore={};NotAfter={}", info.not_before, info.not_after);
    match profile {
        Profile::Alb => {
            let h = |n: &'static str| HeaderName::from_static(n);
            let chain_pem: String = chain.iter().map(|c| c.to_pem()).collect();
            set(
                headers,
                &h("x-amzn-mtls-clientcert"),
                &aws_url_encode(&chain_pem),
            );
            set(
                headers,
                &h("x-amzn-mtls-clientcert-serial-number"),
                &bignum_hex(&info.serial),
            );
            set(
                headers,
                &h("x-amzn-mtls-clientcert-issuer"),
                &openssl_rfc2253(&info.issuer),
            );
            set(
                headers,
                &h("x-amzn-mtls-clientcert-subject"),
                &openssl_rfc2253(&info.subject),
            );
            set(headers, &h("x-amzn-mtls-clientcert-validity"), &validity);
            set(
                headers,
                &h("x-amzn-mtls-clientcert-leaf"),
                &aws_url_encode(&leaf.to_pem()),
            );
        }
        Profile::Cloudfront => {
            let h = |n: &'static str| HeaderName::from_static(n);
            let serial = info.serial.strip_prefix("00:").unwrap_or(&info.serial);
            set(headers, &h("cloudfront-viewer-cert-serial-number"), serial);
            set(
                headers,
                &h("cloudfront-viewer-cert-issuer"),
                &openssl_rfc2253(&info.issuer),
            );
            set(
                headers,
                &h("cloudfront-viewer-cert-subject"),
                &openssl_rfc2253(&info.subject),
            );
            set(headers, &h("cloudfront-viewer-cert-present"), "1");
            set(headers, &h("cloudfront-viewer-cert-sha256"), &info.id);
            set(headers, &h("cloudfront-viewer-cert-validity"), &validity);
            set(
                headers,
                &h("cloudfront-viewer-cert-pem"),
                &aws_url_encode(&leaf.to_pem()),
            );
            set(headers, &h("client-cert"), &sf_binary(leaf.der()));
        }
        Profile::Envoy => set(
            headers,
            &HeaderName::from_static("x-forwarded-client-cert"),
            &xfcc(chain),
        ),
        Profile::Traefik => {
            // The PEM without its BEGIN/END lines and line feeds (the DER in base64), each
            // certificate of the chain as presented, comma-separated.
            let certs: Vec<String> = chain.iter().map(|c| STANDARD.encode(c.der())).collect();
            set(
                headers,
                &HeaderName::from_static("x-forwarded-tls-client-cert"),
                &certs.join(","),
            );
            set(
                headers,
                &HeaderName::from_static("x-forwarded-tls-client-cert-info"),
                &traefik_info(chain),
            );
        }
        Profile::Rfc9440 => {}
    }
}

/// Traefik's `X-Forwarded-Tls-Client-Cert-Info` as its passTLSClientCert middleware writes it
/// with every `info` option on: per certificate of the chain as presented,
/// `Subject="…";Issuer="…";SerialNumber="…";NB="…";NA="…";SAN="…"` (a field without a value is
/// left out), certificates separated by commas, the whole escaped as Go's `url.QueryEscape`
/// does. Names list DC, then C, ST, L, O (and OU for the subject), then the last SN and CN, as
/// Go's `pkix.Name` holds them; values are not escaped (Traefik does not).
fn traefik_info(chain: &[portcullis_pki::Certificate]) -> String {
    let dn = |attrs: &[(String, String)], with_ou: bool| {
        let mut parts: Vec<String> = attrs
            .iter()
            .filter(|(k, _)| k == "DC")
            .map(|(_, v)| format!("DC={v}"))
            .collect();
        let listed: &[(&str, &str)] = if with_ou {
            &[
                ("C", "C"),
                ("ST", "ST"),
                ("L", "L"),
                ("O", "O"),
                ("OU", "OU"),
            ]
        } else {
            &[("C", "C"), ("ST", "ST"), ("L", "L"), ("O", "O")]
        };
        for (short, label) in listed {
            parts.extend(
                attrs
                    .iter()
                    .filter(|(k, v)| k == short && !v.is_empty())
                    .map(|(_, v)| format!("{label}={v}")),
            );
        }
        for (short, label) in [("serialNumber", "SN"), ("CN", "CN")] {
            if let Some((_, v)) = attrs.iter().rev().find(|(k, _)| k == short)
                && !v.is_empty()
            {
                parts.push(format!("{label}={v}"));
            }
        }
        parts.join(",")
    };
    let per_certificate: Vec<String> = chain
        .iter()
        .map(|c| {
            let info = c.info();
            let names = c.name_attributes();
            let mut fields = Vec::new();
            let subject = dn(&names.subject, true);
            if !subject.is_empty() {
                fields.push(format!("Subject=\"{subject}\""));
            }
            let issuer = dn(&names.issuer, false);
            if !issuer.is_empty() {
                fields.push(format!("Issuer=\"{issuer}\""));
            }
            fields.push(format!("SerialNumber=\"{}\"", serial_decimal(&info.serial)));
            fields.push(format!("NB=\"{}\"", info.not_before_unix()));
            fields.push(format!("NA=\"{}\"", info.not_after_unix()));
            let san = |prefix: &str| {
                info.subject_alt_names
                    .iter()
                    .filter_map(move |s| s.strip_prefix(prefix))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            };
            let sans: Vec<String> = ["dns:", "email:", "ip:", "uri:"]
                .iter()
                .flat_map(|p| san(p))
                .collect();
            if !sans.is_empty() {
                fields.push(format!("SAN=\"{}\"", sans.join(",")));
            }
            fields.join(";")
        })
        .collect();
    percent_encode(&per_certificate.join(","), b"").replace("%20", "+")
}

/// A serial (colon hex of its DER content octets, two's complement) in decimal, as Go's
/// `big.Int.String` writes it.
fn serial_decimal(colon_hex: &str) -> String {
    let mut bytes: Vec<u8> = colon_hex
        .split(':')
        .filter_map(|b| u8::from_str_radix(b, 16).ok())
        .collect();
    let negative = bytes.first().is_some_and(|b| b & 0x80 != 0);
    if negative {
        // The magnitude of a two's complement number: invert and add one.
        for b in bytes.iter_mut() {
            *b = !*b;
        }
        for b in bytes.iter_mut().rev() {
            let (v, carry) = b.overflowing_add(1);
            *b = v;
            if !carry {
                break;
            }
        }
    }
    // Repeated division by ten of the big-endian magnitude.
    let mut digits = Vec::new();
    while bytes.iter().any(|&b| b != 0) {
        let mut rem = 0u32;
        for b in bytes.iter_mut() {
            let cur = (rem << 8) | u32::from(*b);
            *b = u8::try_from(cur / 10).unwrap_or(0);
            rem = cur % 10;
        }
        digits.push(char::from(b'0' + u8::try_from(rem).unwrap_or(0)));
    }
    if digits.is_empty() {
        digits.push('0');
    }
    if negative {
        digits.push('-');
    }
    digits.iter().rev().collect()
}

/// A serial as OpenSSL's `BN_bn2hex` writes it (ALB's format): upper-case hex, whole bytes, no
/// separators, without the sign byte DER adds.
fn bignum_hex(colon_hex: &str) -> String {
    let bytes: Vec<&str> = colon_hex.split(':').collect();
    match bytes.iter().position(|b| *b != "00") {
        Some(first) => bytes[first..].concat().to_ascii_uppercase(),
        None => "0".to_string(),
    }
}

/// URL encoding as ALB and CloudFront apply it to PEM: RFC 3986 unreserved characters and `+`,
/// `=`, `/` (their documented safe characters) left as they are.
fn aws_url_encode(text: &str) -> String {
    percent_encode(text, b"+=/")
}

/// Envoy's `x-forwarded-client-cert` element for a verified chain:
/// `Hash=…;Cert="…";Chain="…";Subject="…";URI=…;DNS=…`.
fn xfcc(chain: &[portcullis_pki::Certificate]) -> String {
    let leaf = &chain[0];
    let info = leaf.info();
    let quote = |v: &str| format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""));
    let mut parts = vec![
        format!("Hash={}", info.id),
        format!("Cert={}", quote(&url_encode(&leaf.to_pem()))),
        format!(
            "Chain={}",
            quote(&url_encode(
                &chain.iter().map(|c| c.to_pem()).collect::<String>()
            ))
        ),
        format!("Subject={}", quote(&info.subject)),
    ];
    for san in &info.subject_alt_names {
        if let Some(uri) = san.strip_prefix("uri:") {
            parts.push(format!("URI={uri}"));
        } else if let Some(dns) = san.strip_prefix("dns:") {
            parts.push(format!("DNS={dns}"));
        }
    }
    parts.join(";")
}

/// Percent-encoding of everything but RFC 3986 unreserved characters.
fn url_encode(text: &str) -> String {
    percent_encode(text, b"")
}

/// Percent-encoding of everything but RFC 3986 unreserved characters and `safe`.
fn percent_encode(text: &str, safe: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || safe.contains(&b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(DIGITS[usize::from(b >> 4)] as char);
            out.push(DIGITS[usize::from(b & 15)] as char);
        }
    }
    out
}

/// An RFC 8941 byte sequence: `:base64:`.
fn sf_binary(der: &[u8]) -> String {
    format!(":{}:", STANDARD.encode(der))
}

/// A name as OpenSSL's `-nameopt RFC2253` prints it (what ALB and CloudFront send): RFC 4514
/// text with every byte of a character outside printable ASCII written `\XX` (`CN=Z\C3\BCrich`).
fn openssl_rfc2253(name: &str) -> std::borrow::Cow<'_, str> {
    if name.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return std::borrow::Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(name.len() + 16);
    let mut buf = [0u8; 4];
    for c in name.chars() {
        if (' '..='~').contains(&c) {
            out.push(c);
        } else {
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("\\{b:02X}"));
            }
        }
    }
    std::borrow::Cow::Owned(out)
}

fn set(headers: &mut HeaderMap, name: &HeaderName, value: &str) {
    // Control characters cannot travel in a header; anything else (UTF-8 included) can. C0
    // controls and DEL are single bytes, C1 controls (U+0080–U+009F) start with 0xC2: values
    // without those bytes (base64, hex, most names) are taken as they are.
    let value = if value.bytes().any(|b| b < 0x20 || b == 0x7f || b == 0xc2) {
        std::borrow::Cow::Owned(
            value
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect::<String>(),
        )
    } else {
        std::borrow::Cow::Borrowed(value)
    };
    if let Ok(v) = HeaderValue::from_bytes(value.as_bytes()) {
        headers.insert(name.clone(), v);
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn serials_in_decimal_as_go_writes_them() {
        assert_eq!(serial_decimal("00"), "0");
        assert_eq!(serial_decimal("01"), "1");
        assert_eq!(serial_decimal("00:ff"), "255");
        assert_eq!(serial_decimal("01:00"), "256");
        // 2^64 + 1
        assert_eq!(
            serial_decimal("01:00:00:00:00:00:00:00:01"),
            "18446744073709551617"
        );
        // Two's complement negatives (RFC 5280 forbids them; some CAs made them).
        assert_eq!(serial_decimal("ff"), "-1");
        assert_eq!(serial_decimal("80"), "-128");
        assert_eq!(serial_decimal("ff:7f"), "-129");
    }

    #[test]
    fn alb_and_cloudfront_names_escape_what_openssl_escapes() {
        // `openssl x509 -noout -subject -nameopt RFC2253` on a certificate made with
        // `-subj "/CN=Zürich Straße/O=A\"B, Inc" -utf8` prints exactly this.
        assert_eq!(
            openssl_rfc2253("O=A\\\"B\\, Inc,CN=Zürich Straße"),
            "O=A\\\"B\\, Inc,CN=Z\\C3\\BCrich Stra\\C3\\9Fe"
        );
        assert!(matches!(
            openssl_rfc2253("CN=alice,O=Acme"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn strips_every_spelling_and_configured_names() {
        let mut ids = IdentityHeaders::default();
        ids.rename("subject", "X-SSL-Subject").unwrap();
        let mut h = HeaderMap::new();
        for name in [
            "Client-Cert",
            "client-cert-chain",
            "X-Client-Cert-Subject",
            "x-client-cert-verify",
            "X-Forwarded-Client-Cert",
            "X-SSL-Subject",
            "x-other",
        ] {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("spoof"),
            );
        }
        crate::http::inbound::strip(&ids, false, &mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-other"));
    }

    #[test]
    fn block_lines_and_hyper_headers_carry_the_same_values() {
        use portcullis_pki::{IssueRequest, KeyType, PrivateKey, Profile, SubjectName};
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let root = portcullis_pki::issue::issue(
            &IssueRequest::new(Profile::RootCa, SubjectName::cn("Block Root")),
            &key,
            None,
        )
        .unwrap();
        let mut ids = IdentityHeaders::default();
        ids.rename("subject", "X-SSL-Subject").unwrap();
        ids.xfcc = true;
        let verdict = ClientVerdict::Valid(std::sync::Arc::new(vec![root.clone(), root]));
        let expected = ids.values(&verdict);
        let block = ids.block(&verdict);
        // The HTTP/1.1 lines: every header, in order, each `name: value` CRLF.
        let mut lines = Vec::new();
        for (name, value) in &expected {
            lines.extend_from_slice(format!("{}: ", name).as_bytes());
            lines.extend_from_slice(value.as_bytes());
            lines.extend_from_slice(b"\r\n");
        }
        assert_eq!(block.lines(), &lines[..]);
        // The hyper path: the same headers, replacing whatever was there.
        let mut h = HeaderMap::new();
        h.insert("x-ssl-subject", HeaderValue::from_static("spoof"));
        block.insert_into(&mut h);
        assert_eq!(h, expected);
        assert!(h.contains_key("x-forwarded-client-cert"));
        let empty = IdentityBlock::default();
        assert!(empty.lines().is_empty());
    }

    #[test]
    fn none_verdict_sets_only_the_status() {
        let mut h = HeaderMap::new();
        IdentityHeaders::default().add(&mut h, &ClientVerdict::None);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-client-cert-verify"], "NONE");
    }

    #[test]
    fn renames_are_checked() {
        let mut ids = IdentityHeaders::default();
        assert!(ids.rename("subject", "bad header").is_err());
        assert!(ids.rename("nope", "X-A").is_err());
        assert!(ids.rename("verify", "Host").is_err());
        assert!(ids.rename("verify", "X-Verified").is_ok());
    }

    #[test]
    fn url_encoding_keeps_unreserved_only() {
        assert_eq!(url_encode("a b/+=\n"), "a%20b%2F%2B%3D%0A");
        // ALB's and CloudFront's: `+=/` kept (their documented safe characters).
        assert_eq!(aws_url_encode("a b/+=\n"), "a%20b/+=%0A");
        // ALB's serial: OpenSSL's BN_bn2hex (whole bytes, upper case, no DER sign byte).
        assert_eq!(bignum_hex("03:a5:b1"), "03A5B1");
        assert_eq!(bignum_hex("00:9f:01"), "9F01");
        assert_eq!(bignum_hex("00"), "0");
    }
}

#[cfg(test)]
mod property_tests {
    use super::*;
    use proptest::prelude::*;

    fn header_name() -> impl Strategy<Value = String> {
        (
            prop::sample::select(
                &[
                    "",
                    "x-",
                    "X-",
                    "client-",
                    "Client-",
                    "x-client-cert",
                    "X-Client-Cert",
                    "x-forwarded-client-cert",
                    "CLIENT-CERT",
                ][..],
            ),
            prop::collection::vec(prop::sample::select(&b"abcertACERT-_019"[..]), 0..12),
        )
            .prop_map(|(prefix, rest)| {
                format!("{prefix}{}", String::from_utf8(rest).unwrap_or_default())
            })
            .prop_filter("a header name", |n| {
                HeaderName::from_bytes(n.as_bytes()).is_ok()
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever a certificate field holds, the header value sent upstream carries no line
        /// break or NUL (no header injection), on both paths (the fast path copies these bytes).
        #[test]
        fn identity_values_never_carry_line_breaks(value in "\\PC*|[\\x00-\\x7f]{0,40}") {
            let mut h = HeaderMap::new();
            let name = HeaderName::from_static("x-client-cert-subject");
            set(&mut h, &name, &value);
            if let Some(v) = h.get(&name) {
                prop_assert!(!v.as_bytes().iter().any(|b| matches!(b, b'\r' | b'\n' | 0)));
            }
        }

        /// The fast path's check (on the name as sent) and the hyper path's strip (on the
        /// lower-cased name) agree on every header name, with and without `_` names allowed;
        /// identity names are dropped in every spelling.
        #[test]
        fn both_paths_strip_the_same_names(name in header_name(), underscores in any::<bool>()) {
            let mut ids = IdentityHeaders::default();
            ids.rename("subject", "X-SSL-Subject").unwrap();
            let parsed = HeaderName::from_bytes(name.as_bytes()).unwrap();
            let mut h = HeaderMap::new();
            h.insert(parsed.clone(), HeaderValue::from_static("spoofed"));
            crate::http::inbound::strip(&ids, underscores, &mut h);
            let dropped = crate::http::inbound::dropped(&ids, underscores, &name);
            prop_assert_eq!(dropped, h.is_empty(), "{}", name);
            if ids.is_identity_name(&name.replace('_', "-")) {
                prop_assert!(dropped, "{}", name);
            }
        }

        #[test]
        fn binary_values_round_trip(der in prop::collection::vec(any::<u8>(), 0..300)) {
            let v = sf_binary(&der);
            prop_assert!(v.starts_with(':') && v.ends_with(':'));
            prop_assert_eq!(STANDARD.decode(&v[1..v.len() - 1]).unwrap(), der);
        }
    }
}
