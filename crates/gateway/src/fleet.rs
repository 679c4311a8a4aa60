//! Fleet provisioning by claim as the data path sees it: IoT Core's MQTT API (topic names and
//! JSON payloads), parsed here and answered by the node, which holds the registry and the CA.
//!
//! | request topic | call |
//! | --- | --- |
//! | `$aws/certificates/create/json` | `CreateKeysAndCertificate` (the key is made by us, answered once) |
//! | `$aws/certificates/create-from-csr/json` | `CreateCertificateFromCsr` (the key stays on the device) |
//! | `$aws/provisioning-templates/NAME/provision/json` | `RegisterThing` |
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

const CREATE: &str = "$aws/certificates/create/json";
const CREATE_FROM_CSR: &str = "$aws/certificates/create-from-csr/json";
const TEMPLATES: &str = "$aws/provisioning-templates/";
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
    let call = if topic == CREATE {
        Ok(FleetCall::CreateKeysAndCertificate)
    } else if topic == RENEW {
        object(payload).and_then(|v| match v.get("certificateSigningRequest") {
            Some(Value::String(csr)) if !csr.is_empty() => {
                Ok(FleetCall::Reenroll { csr: csr.clone() })
            }
            _ => Err(FleetError::invalid(
                "InvalidPayload",
                "the payload needs certificateSigningRequest: a CSR in PEM for the same subject",
            )),
        })
    } else if topic == CREATE_FROM_CSR {
        object(payload).and_then(|v| match v.get("certificateSigningRequest") {
            Some(Value::String(csr)) if !csr.is_empty() => {
                Ok(FleetCall::CreateCertificateFromCsr { csr: csr.clone() })
            }
            _ => Err(FleetError::invalid(
                "InvalidPayload",
                "the payload needs certificateSigningRequest: the CSR in PEM",
            )),
        })
    } else {
        let template = topic
            .strip_prefix(TEMPLATES)?
            .strip_suffix("/provision/json")?;
        if template.is_empty() || template.contains('/') {
            return None;
        }
        object(payload).and_then(|v| register(template, &v))
    };
    Some(call)
}

fn object(payload: &[u8]) -> Result<Value, FleetError> {
    if payload.is_empty() {
        return Ok(json!({}));
    }
    match serde_json::from_slice::<Value>(payload) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ => Err(FleetError::invalid(
            "InvalidPayload",
            "the payload must be a JSON object (CBOR topics are not supported: use /json)",
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

/// The reply to a request on `topic`: its topic and JSON payload.
pub(crate) fn reply(topic: &str, answer: &FleetAnswer) -> (String, Vec<u8>) {
    match answer {
        Ok(v) => (format!("{topic}/accepted"), v.to_string().into_bytes()),
        Err(e) => (
            format!("{topic}/rejected"),
            json!({"statusCode": e.status, "errorCode": e.code, "errorMessage": e.message})
                .to_string()
                .into_bytes(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iot_core_topics_and_payloads_are_read() {
        assert_eq!(
            request(CREATE, b"{}"),
            Some(Ok(FleetCall::CreateKeysAndCertificate))
        );
        assert_eq!(
            request(CREATE_FROM_CSR, br#"{"certificateSigningRequest":"PEM"}"#),
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
            "$aws/certificates/create/cbor",
            "$aws/provisioning-templates//provision/json",
            "$aws/provisioning-templates/a/b/provision/json",
        ] {
            assert_eq!(request(other, b"{}"), None, "{other}");
        }
        for bad in [
            &b"[]"[..],
            b"{\"certificateSigningRequest\": 1}",
            b"not json",
        ] {
            let e = request(CREATE_FROM_CSR, bad).unwrap().unwrap_err();
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

    #[test]
    fn rejections_have_iot_cores_shape() {
        let (topic, payload) = reply(CREATE, &Err(FleetError::invalid("InvalidPayload", "why")));
        assert_eq!(topic, "$aws/certificates/create/json/rejected");
        let v: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            v,
            json!({"statusCode": 400, "errorCode": "InvalidPayload", "errorMessage": "why"})
        );
    }
}
