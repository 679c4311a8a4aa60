//! HTTPS publish (`POST /topics/{topic}`), as IoT Core's HTTPS endpoint, and the envelope a
//! forwarding rule delivers.

use std::net::SocketAddr;
use std::sync::Arc;

use portcullis_mqtt::broker::{Broker, Message};
use portcullis_mqtt::codec::QoS;
use portcullis_pki::Certificate;

use super::reserved;
use crate::config::Domain;
use crate::verify::DomainVerifier;

/// `POST /topics/{topic}?qos=0|1[&retain=true]` over HTTPS: the body is published to MQTT
/// subscribers if the certificate's policies allow `mqtt:Publish` on `topic:<topic>`.
pub(crate) async fn https_publish(
    req: hyper::Request<hyper::body::Incoming>,
    leaf: &Certificate,
    verifier: &Arc<DomainVerifier>,
    domain: &Domain,
    broker: &Broker,
    peer: SocketAddr,
) -> hyper::Response<crate::http::respond::Body> {
    use http_body_util::BodyExt;
    use hyper::StatusCode;

    use crate::http::respond::{error_response, full};
    if req.method() != hyper::Method::POST {
        return error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "publish with POST /topics/{topic}?qos=0|1",
            None,
        );
    }
    let raw = req.uri().path().trim_start_matches("/topics/");
    let topic = match crate::authorize::percent_decode(raw) {
        Some(t) => t,
        None => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid-topic",
                "the topic is not valid percent-encoded UTF-8",
                None,
            );
        }
    };
    if let Err(why) = portcullis_mqtt::topic::check_name(&topic)
        .map_err(|e| e.to_string())
        .and_then(|()| reserved(&topic))
    {
        return error_response(StatusCode::BAD_REQUEST, "invalid-topic", &why, None);
    }
    let mut qos = QoS::AtMostOnce;
    let mut retain = false;
    for pair in req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=').unwrap_or((pair, "")) {
            ("qos", "0") => qos = QoS::AtMostOnce,
            ("qos", "1") => qos = QoS::AtLeastOnce,
            ("retain", "true") => retain = true,
            ("retain", "false") => retain = false,
            _ => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid-query",
                    &format!("'{pair}': the query takes qos=0|1 and retain=true|false"),
                    None,
                );
            }
        }
    }
    // The body is read first (bounded): answering before it is read makes HTTP/2 clients see
    // the stream reset.
    let max = domain.mqtt.max_packet_size;
    let payload = match http_body_util::Limited::new(req.into_body(), max)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                &format!("the message is larger than {max} bytes (mqtt.max_packet_size)"),
                None,
            );
        }
    };
    let decision = verifier.registry_snapshot().policies().decide(
        Some(leaf),
        &domain.hostname.to_string(),
        "mqtt:Publish",
        &format!("topic:{topic}"),
        peer.ip(),
    );
    if !decision.allowed {
        metrics::counter!("portcullis_mqtt_denials_total", "action" => "publish", "reason" => "not-allowed").increment(1);
        return error_response(
            StatusCode::FORBIDDEN,
            "policy-denied",
            &format!("Access denied: {}.", decision.reason),
            None,
        );
    }
    let message = Message {
        topic: topic.clone(),
        payload,
        qos,
        retain,
        properties: Default::default(),
        expires_at: None,
        sent_as: None,
        preferred_id: None,
        released: false,
        receipt: None,
    };
    verifier.forward(|| envelope(&message, None, leaf, verifier), &topic);
    let mut routed = broker.publish(message, None);
    // In a cluster, a QoS 1 or retained message is answered once the cluster stored it.
    if let Some(confirm) = routed.confirm.take() {
        let stored = match tokio::time::timeout(std::time::Duration::from_secs(15), confirm).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("the cluster connection closed".into()),
            Err(_) => Err("no answer within 15 s".into()),
        };
        if let Err(why) = stored {
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "not-stored",
                &format!("the cluster could not store the message ({why}); send it again"),
                None,
            );
        }
    }
    super::message_counters().in_accepted.increment(1);
    let body = serde_json::json!({
        "topic": topic,
        "qos": qos as u8,
        "delivered": routed.delivered,
        "queued": routed.queued,
    });
    let mut resp = hyper::Response::new(full(body.to_string()));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// The JSON a forwarding rule delivers for a message: the payload as text when it is UTF-8,
/// base64 otherwise, with who sent it.
pub(super) fn envelope(
    message: &Message,
    client_id: Option<&str>,
    leaf: &Certificate,
    verifier: &DomainVerifier,
) -> String {
    use base64::Engine;
    let id = &leaf.info().id;
    let things: Vec<String> = verifier
        .registry_snapshot()
        .policies()
        .things_of(id)
        .to_vec();
    let (payload, encoding) = match std::str::from_utf8(&message.payload) {
        Ok(text) => (serde_json::Value::String(text.to_string()), "utf-8"),
        Err(_) => (
            serde_json::Value::String(
                base64::engine::general_purpose::STANDARD.encode(&message.payload),
            ),
            "base64",
        ),
    };
    serde_json::json!({
        "event": "mqtt.message",
        "occurred_at": crate::authorize::now(),
        "topic": message.topic,
        "payload": payload,
        "payload_encoding": encoding,
        "qos": message.qos as u8,
        "retain": message.retain,
        "client_id": client_id,
        "certificate_id": id,
        "thing": things.first(),
        "things": things,
    })
    .to_string()
}
