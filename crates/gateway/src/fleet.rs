//! Fleet provisioning by claim as the data path sees it: IoT Core's MQTT API (topic names and
//! JSON payloads), parsed here and answered by the node, which holds the registry and the CA.
//!
//! | request topic | call |
//! | --- | --- |
//! | `$aws/certificates/create/json` | `CreateKeysAndCertificate` (the key is made by us, answered once) |
//! | `$aws/certificates/create-from-csr/json` | `CreateCertificateFromCsr` (the key stays on the device) |
//! | `$aws/provisioning-templates/NAME/provision/json` | `RegisterThing` |
//!
//! Each also on `…/cbor` with CBOR payloads (a map with text keys), answered in CBOR.
//!
//! Each is answered on `<request topic>/accepted` or `/rejected`, to the connection that asked
//! only (another device subscribed to the same reply topic never sees a key or a token).
//! Rejections have IoT Core's shape: `{"statusCode", "errorCode", "errorMessage"}`.
//!
//! Invariant: the session never waits for the answer: the call runs on its own task and the
//! answer comes back through the session's reply channel.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use portcullis_pki::Certificate;
use serde_json::{Value, json};

/// What a device asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetCall {
    /// `CreateKeysAndCertificate`.
    CreateKeysAndCertificate,
    /// `CreateCertificateFromCsr` with the CSR (PEM).
    CreateCertificateFromCsr {
        /// The device's CSR, PEM.
        csr: String,
    },
    /// EST `simpleenroll` (RFC 7030): the CSR signed and registered under `template` at once
    /// (the caller is a claim certificate allowed the template).
    EstEnroll {
        /// The CSR, PEM.
        csr: String,
        /// The template (the EST CA label), if one was named.
        template: Option<String>,
        /// A one-time enrollment code (HTTP Basic authentication's password), for a device
        /// with no certificate yet.
        code: Option<String>,
        /// `serverkeygen` (RFC 7030 §4.4): the key is made by us, for the CSR's subject, and
        /// answered once with the certificate.
        server_keygen: bool,
    },
    /// Renewal (EST `simplereenroll`, or MQTT `$portcullis/certificates/renew/json`): the
    /// caller (a registered ACTIVE certificate) gets a new certificate for the same subject,
    /// attached where it is.
    Reenroll {
        /// The CSR, PEM.
        csr: String,
    },
    /// EST `cacerts`: the CA certificates devices' certificates chain to.
    CaCertificates,
    /// A short-lived JWT for the caller's certificate.
    Token {
        /// Who the token is for (`aud`).
        audience: String,
        /// Its lifetime in seconds (at most an hour).
        lifetime_secs: u64,
        /// The issuer (`iss`): the URL of the mapping on the domain.
        issuer: String,
    },
    /// The keys tokens are verified with (JWKS).
    Jwks,
    /// SCEP `GetCACert`: the RA's certificates and the CA's.
    ScepCaCertificates,
    /// SCEP `PKIOperation`: the client's `pkiMessage` (DER), answered with a `CertRep`.
    ScepOperation {
        /// The message as sent.
        message: Vec<u8>,
    },
    /// `RegisterThing`.
    RegisterThing {
        /// The template named in the topic.
        template: String,
        /// The certificate ownership token.
        token: String,
        /// The parameters sent.
        parameters: BTreeMap<String, String>,
    },
}

/// A device's request with who asked.
#[derive(Debug, Clone)]
pub struct FleetRequest {
    /// The call.
    pub call: FleetCall,
    /// The certificate the device connected with (a claim, or a device's own); none only for
    /// an EST enrollment with a one-time code.
    pub caller: Option<Certificate>,
    /// Its MQTT client id.
    pub client_id: String,
}

/// A refusal, as IoT Core shapes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetError {
    /// HTTP-like status (400, 403, 404, 429, 500).
    pub status: u16,
    /// IoT Core's error code (`InvalidPayload`, `InvalidCertificateOwnershipToken`, …).
    pub code: &'static str,
    /// What was wrong and how to fix it.
    pub message: String,
}

impl FleetError {
    /// A 400 with `code`.
    pub fn invalid(code: &'static str, message: impl Into<String>) -> FleetError {
        FleetError {
            status: 400,
            code,
            message: message.into(),
        }
    }
}

/// An answer: the accepted payload, or the refusal.
pub type FleetAnswer = Result<Value, FleetError>;

/// The node's side: makes certificates and registers things.
pub trait FleetProvisioning: Send + Sync + std::fmt::Debug {
    /// Answers a device's request.
    fn call(&self, request: FleetRequest) -> Pin<Box<dyn Future<Output = FleetAnswer> + Send>>;
}

const CREATE: &str = "$aws/certificates/create";
const CREATE_FROM_CSR: &str = "$aws/certificates/create-from-csr";
const TEMPLATES: &str = "$aws/provisioning-templates/";

/// How a request's payload (and so its answer) is written: the topic's last level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Cbor,
}

/// A request topic without its format level, and the format.
fn format_of(topic: &str) -> Option<(&str, Format)> {
    if let Some(base) = topic.strip_suffix("/json") {
        Some((base, Format::Json))
    } else {
        topic.strip_suffix("/cbor").map(|base| (base, Format::Cbor))
    }
}
/// A device renews its own certificate over MQTT (Portcullis's own topic: IoT Core has none).
pub(crate) const RENEW: &str = "$portcullis/certificates/renew/json";

/// Whether `topic_or_filter` is the renewal request or one of its replies: every device may
/// renew its own certificate (the new one has the same subject and goes where the old one is),
/// so no policy has to name these.
pub(crate) fn self_service(topic_or_filter: &str) -> bool {
    topic_or_filter == RENEW
        || topic_or_filter == "$portcullis/certificates/renew/json/accepted"
        || topic_or_filter == "$portcullis/certificates/renew/json/rejected"
}

/// The call a PUBLISH to `topic` makes, `None` when `topic` is not a fleet provisioning
/// request; `Err` (answered as a rejection) when the payload is not what the call takes.
pub(crate) fn request(topic: &str, payload: &[u8]) -> Option<Result<FleetCall, FleetError>> {
    if topic == RENEW {
        return Some(
            object(payload, Format::Json).and_then(|v| match v.get("certificateSigningRequest") {
                Some(Value::String(csr)) if !csr.is_empty() => {
                    Ok(FleetCall::Reenroll { csr: csr.clone() })
                }
                _ => Err(FleetError::invalid(
                    "InvalidPayload",
                    "the payload needs certificateSigningRequest: a CSR in PEM for the same subject",
                )),
            }),
        );
    }
    let (base, format) = format_of(topic)?;
    let call = if base == CREATE {
        object(payload, format).map(|_| FleetCall::CreateKeysAndCertificate)
    } else if base == CREATE_FROM_CSR {
        object(payload, format).and_then(|v| match v.get("certificateSigningRequest") {
            Some(Value::String(csr)) if !csr.is_empty() => {
                Ok(FleetCall::CreateCertificateFromCsr { csr: csr.clone() })
            }
            _ => Err(FleetError::invalid(
                "InvalidPayload",
                "the payload needs certificateSigningRequest: the CSR in PEM",
            )),
        })
    } else {
        let template = base.strip_prefix(TEMPLATES)?.strip_suffix("/provision")?;
        if template.is_empty() || template.contains('/') {
            return None;
        }
        object(payload, format).and_then(|v| register(template, &v))
    };
    Some(call)
}

fn object(payload: &[u8], format: Format) -> Result<Value, FleetError> {
    if payload.is_empty() {
        return Ok(json!({}));
    }
    let parsed = match format {
        Format::Json => serde_json::from_slice::<Value>(payload).ok(),
        Format::Cbor => ciborium::de::from_reader::<Value, _>(payload).ok(),
    };
    match parsed {
        Some(v @ Value::Object(_)) => Ok(v),
        _ => Err(FleetError::invalid(
            "InvalidPayload",
            match format {
                Format::Json => "the payload must be a JSON object",
                Format::Cbor => "the payload must be a CBOR map with text keys",
            },
        )),
    }
}

fn register(template: &str, v: &Value) -> Result<FleetCall, FleetError> {
    let Some(Value::String(token)) = v.get("certificateOwnershipToken") else {
        return Err(FleetError::invalid(
            "InvalidPayload",
            "the payload needs certificateOwnershipToken (from CreateKeysAndCertificate or CreateCertificateFromCsr)",
        ));
    };
    let mut parameters = BTreeMap::new();
    match v.get("parameters") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (k, value) in map {
                let Value::String(s) = value else {
                    return Err(FleetError::invalid(
                        "InvalidPayload",
                        format!("parameter '{k}' must be a string"),
                    ));
                };
                parameters.insert(k.clone(), s.clone());
            }
        }
        Some(_) => {
            return Err(FleetError::invalid(
                "InvalidPayload",
                "parameters must be an object of strings",
            ));
        }
    }
    Ok(FleetCall::RegisterThing {
        template: template.to_string(),
        token: token.clone(),
        parameters,
    })
}

/// Whether `filter` subscribes to fleet provisioning replies (answered by the session, never
/// routed by the broker).
pub(crate) fn is_reply_filter(filter: &str) -> bool {
    filter.starts_with("$aws/certificates/")
        || filter.starts_with(TEMPLATES)
        || filter.starts_with("$portcullis/certificates/")
}

/// The reply to a request on `topic`: its topic and payload, in the request's format.
pub(crate) fn reply(topic: &str, answer: &FleetAnswer) -> (String, Vec<u8>) {
    let (suffix, value) = match answer {
        Ok(v) => ("accepted", v.clone()),
        Err(e) => (
            "rejected",
            json!({"statusCode": e.status, "errorCode": e.code, "errorMessage": e.message}),
        ),
    };
    let payload = match format_of(topic) {
        Some((_, Format::Cbor)) => {
            let mut out = Vec::new();
            // Writing a JSON value to a Vec cannot fail.
            let _ = ciborium::ser::into_writer(&value, &mut out);
            out
        }
        _ => value.to_string().into_bytes(),
    };
    (format!("{topic}/{suffix}"), payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREATE_JSON: &str = "$aws/certificates/create/json";
    const CREATE_FROM_CSR_JSON: &str = "$aws/certificates/create-from-csr/json";

    fn cbor(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::ser::into_writer(v, &mut out).unwrap();
        out
    }

    #[test]
    fn iot_core_topics_and_payloads_are_read() {
        assert_eq!(
            request(CREATE_JSON, b"{}"),
            Some(Ok(FleetCall::CreateKeysAndCertificate))
        );
        assert_eq!(
            request(
                CREATE_FROM_CSR_JSON,
                br#"{"certificateSigningRequest":"PEM"}"#
            ),
            Some(Ok(FleetCall::CreateCertificateFromCsr {
                csr: "PEM".into()
            }))
        );
        let Some(Ok(FleetCall::RegisterThing {
            template,
            token,
            parameters,
        })) = request(
            "$aws/provisioning-templates/factory/provision/json",
            br#"{"certificateOwnershipToken":"t","parameters":{"SerialNumber":"1"}}"#,
        )
        else {
            panic!("not a RegisterThing");
        };
        assert_eq!((template.as_str(), token.as_str()), ("factory", "t"));
        assert_eq!(parameters["SerialNumber"], "1");
        for other in [
            "devices/x",
            "$aws/certificates/create/xml",
            "$aws/certificates/create",
            "$aws/provisioning-templates//provision/json",
            "$aws/provisioning-templates/a/b/provision/json",
            "$portcullis/certificates/renew/cbor",
        ] {
            assert_eq!(request(other, b"{}"), None, "{other}");
        }
        for bad in [
            &b"[]"[..],
            b"{\"certificateSigningRequest\": 1}",
            b"not json",
        ] {
            let e = request(CREATE_FROM_CSR_JSON, bad).unwrap().unwrap_err();
            assert_eq!((e.status, e.code), (400, "InvalidPayload"));
        }
        let e = request(
            "$aws/provisioning-templates/t/provision/json",
            br#"{"certificateOwnershipToken":"t","parameters":{"a":1}}"#,
        )
        .unwrap()
        .unwrap_err();
        assert!(e.message.contains("'a'"), "{e:?}");
    }

    /// IoT Core's `/cbor` topics: the same calls with CBOR payloads, answered in CBOR.
    #[test]
    fn cbor_topics_are_read_and_answered_in_cbor() {
        assert_eq!(
            request(
                "$aws/certificates/create-from-csr/cbor",
                &cbor(&json!({"certificateSigningRequest": "PEM"}))
            ),
            Some(Ok(FleetCall::CreateCertificateFromCsr {
                csr: "PEM".into()
            }))
        );
        assert_eq!(
            request("$aws/certificates/create/cbor", &cbor(&json!({}))),
            Some(Ok(FleetCall::CreateKeysAndCertificate))
        );
        let Some(Ok(FleetCall::RegisterThing { parameters, .. })) = request(
            "$aws/provisioning-templates/factory/provision/cbor",
            &cbor(&json!({"certificateOwnershipToken": "t", "parameters": {"SerialNumber": "7"}})),
        ) else {
            panic!("not a RegisterThing");
        };
        assert_eq!(parameters["SerialNumber"], "7");
        // JSON on a CBOR topic, truncated and deeply nested CBOR: refused, never a panic.
        let deep: Vec<u8> = std::iter::repeat_n(0x81u8, 10_000).collect();
        for bad in [&br#"{"a":"b"}"#[..], &[0xa1, 0x61], &deep] {
            let e = request("$aws/certificates/create-from-csr/cbor", bad)
                .unwrap()
                .unwrap_err();
            assert_eq!(e.code, "InvalidPayload");
        }
        let (topic, payload) = reply(
            "$aws/certificates/create/cbor",
            &Ok(json!({"certificateId": "x"})),
        );
        assert_eq!(topic, "$aws/certificates/create/cbor/accepted");
        let back: Value = ciborium::de::from_reader(payload.as_slice()).unwrap();
        assert_eq!(back, json!({"certificateId": "x"}));
    }

    #[test]
    fn rejections_have_iot_cores_shape() {
        let (topic, payload) = reply(
            CREATE_JSON,
            &Err(FleetError::invalid("InvalidPayload", "why")),
        );
        assert_eq!(topic, "$aws/certificates/create/json/rejected");
        let v: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            v,
            json!({"statusCode": 400, "errorCode": "InvalidPayload", "errorMessage": "why"})
        );
    }
}
