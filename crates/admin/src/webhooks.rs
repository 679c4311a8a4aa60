//! Webhook routes: subscriptions, their deliveries, replays and the expiry check.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Api, ApiResult, Body, Caller, Params, to_json};
use portcullis_registry::WebhookUpdate;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateWebhook {
    name: String,
    url: String,
    events: Vec<String>,
    #[serde(default = "default_days")]
    expiring_days: i64,
    #[serde(default)]
    ca_pem: String,
    /// For `mqtt.message`: which messages (an MQTT topic filter).
    topic_filter: Option<String>,
}

fn default_days() -> i64 {
    30
}

pub(super) async fn create_webhook(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Body(req): Body<CreateWebhook>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let (hook, secret) = api
        .store
        .create_webhook(
            &portcullis_registry::NewWebhook {
                name: &req.name,
                url: &req.url,
                events: &req.events,
                expiring_days: req.expiring_days,
                ca_pem: &req.ca_pem,
                topic_filter: req.topic_filter.as_deref(),
            },
            &caller,
        )
        .await?;
    let mut body = serde_json::to_value(&hook).unwrap_or_default();
    body["secret"] = json!(secret);
    Ok((StatusCode::CREATED, Json(body)))
}

pub(super) async fn list_webhooks(State(api): State<Api>) -> ApiResult {
    Ok(Json(json!({"items": api.store.list_webhooks().await?})))
}

pub(super) async fn describe_webhook(State(api): State<Api>, Path(id): Path<String>) -> ApiResult {
    Ok(to_json(&api.store.webhook(&id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpdateWebhook {
    url: Option<String>,
    events: Option<Vec<String>>,
    enabled: Option<bool>,
    expiring_days: Option<i64>,
    ca_pem: Option<String>,
}

pub(super) async fn update_webhook(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
    Body(req): Body<UpdateWebhook>,
) -> ApiResult {
    let update = WebhookUpdate {
        url: req.url,
        events: req.events,
        enabled: req.enabled,
        expiring_days: req.expiring_days,
        ca_pem: req.ca_pem,
    };
    Ok(to_json(
        &api.store.update_webhook(&id, &update, &caller).await?,
    ))
}

pub(super) async fn delete_webhook(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    api.store.delete_webhook(&id, &caller).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeliveryQuery {
    status: Option<String>,
    limit: Option<i64>,
}

pub(super) async fn list_deliveries(
    State(api): State<Api>,
    Path(id): Path<String>,
    Params(q): Params<DeliveryQuery>,
) -> ApiResult {
    let items = api
        .store
        .deliveries(&id, q.status.as_deref(), q.limit.unwrap_or(100))
        .await?;
    Ok(Json(json!({"items": items})))
}

pub(super) async fn describe_delivery(State(api): State<Api>, Path(id): Path<String>) -> ApiResult {
    Ok(to_json(&api.store.delivery(&id).await?))
}

pub(super) async fn replay_delivery(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let delivery = api.store.replay_delivery(&id, &caller).await?;
    Ok((StatusCode::CREATED, to_json(&delivery)))
}

pub(super) async fn expiry_check(State(api): State<Api>) -> ApiResult {
    let made = api.store.check_expiring().await?;
    Ok(Json(json!({"deliveries": made})))
}
