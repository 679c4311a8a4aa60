//! Device enrollment: `POST /v1/enrollments` issues a client certificate with the local CA,
//! registers it ACTIVE, and answers once with what IT hands to a device or an MDM: a PKCS#12
//! bundle (modern and legacy encryption) and an Apple configuration profile (`.mobileconfig`)
//! holding the bundle and the CA. The private key is never stored.
//!
//! `POST /v1/enrollments/scep` answers a `.mobileconfig` with a SCEP payload instead: the
//! device makes its own key and enrolls over SCEP (`builtin:scep`) with a one-time challenge.

use axum::Extension;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use portcullis_pki::p12::{self, P12Format};
use portcullis_pki::{Certificate, IssueRequest, KeyType, PrivateKey, Profile, SubjectName};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Api, ApiError, Body, Caller};
use portcullis_registry::CertStatus;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Enrollment {
    common_name: String,
    #[serde(default)]
    days: Option<u32>,
    /// Protects the PKCS#12 bundles.
    password: String,
    /// Also write the password into the `.mobileconfig` (a silent MDM install). Off by default:
    /// a file that carries both the key and its password is a leak; MDMs can supply it.
    #[serde(default)]
    embed_password: bool,
    /// Issue a common name holding `/ + # * ? $` (policies never substitute such a value).
    #[serde(default)]
    allow_separators: bool,
}

pub(crate) async fn enroll(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Body(req): Body<Enrollment>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let issuer = api.issuer.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "no-local-ca",
            "this registry has no local CA to issue device certificates with",
        )
    })?;
    let cn = req.common_name.trim();
    if cn.is_empty() || cn.len() > 64 {
        return Err(ApiError::invalid("common_name must be 1-64 characters"));
    }
    if req.password.chars().count() < 8 || req.password.len() > 128 {
        return Err(ApiError::invalid(
            "password must be 8-128 characters: it protects the private key in the bundle",
        ));
    }
    let mut request = IssueRequest::new(Profile::Client, SubjectName::cn(cn));
    if let Some(days) = req.days {
        if days == 0 || days > 3650 {
            return Err(ApiError::invalid("days must be between 1 and 3650"));
        }
        request.days = days;
    }
    let key = PrivateKey::generate(KeyType::EcP256)?;
    let cert = portcullis_pki::issue::issue(&request, &key, Some(&issuer))?;
    super::certificates::check_separators(&cert, req.allow_separators)?;
    let chain = issuer.chain();
    let modern = p12::export(&cert, &key, &chain, &req.password, P12Format::Modern)?;
    let legacy = p12::export(&cert, &key, &chain, &req.password, P12Format::Legacy)?;
    let record = api
        .store
        .register_certificate(cert.to_pem().as_bytes(), CertStatus::Active, &caller)
        .await?;
    let root = chain.last().unwrap_or(&cert);
    // Profiles carry the legacy bundle: every macOS and iOS version reads it.
    let profile = mobileconfig(
        &cert,
        root,
        &legacy,
        req.embed_password.then_some(req.password.as_str()),
    );
    let file = file_stem(cn);
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "certificate": record,
            "issuer_cn": chain.first().and_then(|c| c.subject_attribute("CN")),
            "files": {
                "p12": {"name": format!("{file}.p12"), "base64": STANDARD.encode(&modern)},
                "p12_legacy": {"name": format!("{file}-legacy.p12"), "base64": STANDARD.encode(&legacy)},
                "mobileconfig": {"name": format!("{file}.mobileconfig"), "base64": STANDARD.encode(profile.as_bytes())},
            },
        })),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ScepProfile {
    /// The provisioning template the device is enrolled under (its one-time code's).
    template: String,
    /// Where devices reach the `builtin:scep` mapping (`https://HOST[:PORT]/BASE`).
    scep_url: String,
    /// The device's common name (the certificate's subject CN).
    common_name: String,
    /// How long the challenge is good, in hours (default a week).
    #[serde(default)]
    ttl_hours: Option<i64>,
    /// RSA key size the device makes (2048, 3072 or 4096; default 2048).
    #[serde(default)]
    key_size: Option<u32>,
}

/// `POST /v1/enrollments/scep`: an Apple configuration profile whose SCEP payload makes the
/// device generate its own key (never extractable) and enroll with a one-time challenge (an
/// enrollment code of `template`), with the CA as a root payload. Nothing is issued until the
/// device asks; the certificate is then registered ACTIVE and attached by the template.
pub(crate) async fn scep_profile(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Body(req): Body<ScepProfile>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let issuer = api.issuer.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "no-local-ca",
            "this registry has no local CA to issue device certificates with",
        )
    })?;
    let cn = req.common_name.trim();
    if cn.is_empty() || cn.len() > 64 || cn.chars().any(|c| "/+#*?$,=\"\\".contains(c)) {
        return Err(ApiError::invalid(
            "common_name must be 1-64 characters without / + # * ? $ , = \" or \\",
        ));
    }
    let url = req.scep_url.trim();
    if !(url.starts_with("https://") || url.starts_with("http://"))
        || url.len() > 2048
        || url.contains(char::is_whitespace)
    {
        return Err(ApiError::invalid(
            "scep_url must be the http(s) URL of a builtin:scep mapping, such as https://gateway.example.com/scep",
        ));
    }
    let key_size = req.key_size.unwrap_or(2048);
    if ![2048, 3072, 4096].contains(&key_size) {
        return Err(ApiError::invalid("key_size must be 2048, 3072 or 4096"));
    }
    let ttl_hours = req.ttl_hours.unwrap_or(24 * 7);
    if !(1..=8760).contains(&ttl_hours) {
        return Err(ApiError::invalid("ttl_hours must be between 1 and 8760"));
    }
    let (codes, expires_at) = api
        .store
        .create_enrollment_codes(&req.template, 1, ttl_hours * 3600, &caller)
        .await?;
    let challenge = codes.into_iter().next().unwrap_or_default();
    let chain = issuer.chain();
    let root = chain.last().unwrap_or(issuer.certificate());
    let profile = scep_mobileconfig(url, cn, &challenge, key_size, root);
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "template": req.template,
            "challenge": challenge,
            "expires_at": expires_at,
            "files": {
                "mobileconfig": {"name": format!("{}.mobileconfig", file_stem(cn)), "base64": STANDARD.encode(profile.as_bytes())},
            },
        })),
    ))
}

/// An Apple configuration profile with a SCEP payload (the device makes a non-extractable RSA
/// key and enrolls with `challenge`) and the root CA.
fn scep_mobileconfig(
    url: &str,
    cn: &str,
    challenge: &str,
    key_size: u32,
    root: &Certificate,
) -> String {
    let top = uuid();
    let scep = uuid();
    let anchor = uuid();
    let x = xml_escape;
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
  <key>PayloadContent</key>
  <array>
    <dict>
      <key>PayloadType</key><string>com.apple.security.scep</string>
      <key>PayloadVersion</key><integer>1</integer>
      <key>PayloadIdentifier</key><string>dev.portcullis.enrollment.{top}.scep</string>
      <key>PayloadUUID</key><string>{scep}</string>
      <key>PayloadDisplayName</key><string>{name} (device identity, SCEP)</string>
      <key>PayloadContent</key>
      <dict>
        <key>URL</key><string>{url}</string>
        <key>Name</key><string>Portcullis</string>
        <key>Subject</key>
        <array><array><array><string>CN</string><string>{name}</string></array></array></array>
        <key>Challenge</key><string>{challenge}</string>
        <key>Key Type</key><string>RSA</string>
        <key>Keysize</key><integer>{key_size}</integer>
        <key>Key Usage</key><integer>5</integer>
        <key>KeyIsExtractable</key><false/>
        <key>AllowAllAppsAccess</key><false/>
        <key>Retries</key><integer>3</integer>
        <key>RetryDelay</key><integer>10</integer>
      </dict>
    </dict>
    <dict>
      <key>PayloadType</key><string>com.apple.security.root</string>
      <key>PayloadVersion</key><integer>1</integer>
      <key>PayloadIdentifier</key><string>dev.portcullis.enrollment.{top}.ca</string>
      <key>PayloadUUID</key><string>{anchor}</string>
      <key>PayloadDisplayName</key><string>{ca}</string>
      <key>PayloadCertificateFileName</key><string>ca.cer</string>
      <key>PayloadContent</key><data>{root}</data>
    </dict>
  </array>
  <key>PayloadDisplayName</key><string>Device certificate: {name}</string>
  <key>PayloadDescription</key><string>Makes this device's own key (it never leaves the device) and gets its certificate by SCEP from Portcullis, with a one-time challenge; installs the CA that issued the gateway's server certificates.</string>
  <key>PayloadIdentifier</key><string>dev.portcullis.enrollment.{top}</string>
  <key>PayloadOrganization</key><string>Portcullis</string>
  <key>PayloadType</key><string>Configuration</string>
  <key>PayloadUUID</key><string>{top}</string>
  <key>PayloadVersion</key><integer>1</integer>
</dict>
</plist>
"#,
        name = x(cn),
        url = x(url),
        challenge = x(challenge),
        ca = x(&root.info().subject),
        root = STANDARD.encode(root.der()),
    )
}

/// A file name from a common name: letters, digits, `-`, `_` and `.` kept, the rest `-`; the
/// enrollment's files are `STEM.p12`, `STEM-legacy.p12` and `STEM.mobileconfig`.
pub fn file_stem(cn: &str) -> String {
    let stem: String = cn
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let stem = stem.trim_matches(|c| c == '-' || c == '.').to_string();
    if stem.is_empty() {
        "device".into()
    } else {
        stem
    }
}

/// An Apple configuration profile with a PKCS#12 identity payload and the root CA.
/// The password is written into the identity payload only when given (`embed_password`);
/// without it, the device's user (or the MDM) types it when the profile is installed.
fn mobileconfig(
    cert: &Certificate,
    root: &Certificate,
    p12: &[u8],
    password: Option<&str>,
) -> String {
    let subject = cert
        .subject_attribute("CN")
        .unwrap_or_else(|| cert.info().subject.clone());
    let top = uuid();
    let identity = uuid();
    let anchor = uuid();
    let x = xml_escape;
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
  <key>PayloadContent</key>
  <array>
    <dict>
      <key>PayloadType</key><string>com.apple.security.pkcs12</string>
      <key>PayloadVersion</key><integer>1</integer>
      <key>PayloadIdentifier</key><string>dev.portcullis.enrollment.{top}.identity</string>
      <key>PayloadUUID</key><string>{identity}</string>
      <key>PayloadDisplayName</key><string>{name} (device identity)</string>
      <key>PayloadCertificateFileName</key><string>{file}.p12</string>
{password}      <key>PayloadContent</key><data>{p12}</data>
    </dict>
    <dict>
      <key>PayloadType</key><string>com.apple.security.root</string>
      <key>PayloadVersion</key><integer>1</integer>
      <key>PayloadIdentifier</key><string>dev.portcullis.enrollment.{top}.ca</string>
      <key>PayloadUUID</key><string>{anchor}</string>
      <key>PayloadDisplayName</key><string>{ca}</string>
      <key>PayloadCertificateFileName</key><string>ca.cer</string>
      <key>PayloadContent</key><data>{root}</data>
    </dict>
  </array>
  <key>PayloadDisplayName</key><string>Device certificate: {name}</string>
  <key>PayloadDescription</key><string>Installs the client certificate this device presents to services behind Portcullis, and the CA that issued their server certificates.</string>
  <key>PayloadIdentifier</key><string>dev.portcullis.enrollment.{top}</string>
  <key>PayloadOrganization</key><string>Portcullis</string>
  <key>PayloadType</key><string>Configuration</string>
  <key>PayloadUUID</key><string>{top}</string>
  <key>PayloadVersion</key><integer>1</integer>
</dict>
</plist>
"#,
        name = x(&subject),
        file = x(&file_stem(&subject)),
        password = password
            .map(|p| format!("      <key>Password</key><string>{}</string>\n", x(p)))
            .unwrap_or_default(),
        p12 = STANDARD.encode(p12),
        ca = x(&root.info().subject),
        root = STANDARD.encode(root.der()),
    )
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// A random (version 4) UUID, upper-case as Apple writes them.
fn uuid() -> String {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).unwrap_or_else(|_| std::process::abort());
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02X}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_and_uuids_are_safe() {
        assert_eq!(file_stem("laptop-7"), "laptop-7");
        assert_eq!(file_stem("../<b>x y"), "b-x-y");
        assert_eq!(file_stem("///"), "device");
        let u = uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(u, uuid());
        assert_eq!(xml_escape("a<&>\"'"), "a&lt;&amp;&gt;&quot;&apos;");
    }
}
