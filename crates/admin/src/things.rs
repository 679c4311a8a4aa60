//! Thing routes: things, their attributes, and certificates attached to them.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Api, ApiResult, Body, Caller, Params, cert_id, to_json};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateThing {
    name: String,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

pub(super) async fn create_thing(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Body(req): Body<CreateThing>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let thing = api
        .store
        .create_thing(&req.name, &req.attributes, &caller)
        .await?;
    Ok((StatusCode::CREATED, to_json(&thing)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Page {
    after: Option<String>,
    limit: Option<u32>,
}

pub(super) async fn list_things(State(api): State<Api>, Params(q): Params<Page>) -> ApiResult {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let items = api.store.list_things(q.after.as_deref(), limit).await?;
    let next = (items.len() == limit as usize)
        .then(|| items.last().map(|t| t.name.clone()))
        .flatten();
    Ok(Json(json!({"items": items, "next": next})))
}

pub(super) async fn describe_thing(State(api): State<Api>, Path(name): Path<String>) -> ApiResult {
    Ok(to_json(&api.store.thing(&name).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpdateThing {
    /// Attributes to set; `null` removes one.
    attributes: BTreeMap<String, Option<String>>,
}

pub(super) async fn update_thing(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(name): Path<String>,
    Body(req): Body<UpdateThing>,
) -> ApiResult {
    Ok(to_json(
        &api.store
            .update_thing(&name, &req.attributes, &caller)
            .await?,
    ))
}

pub(super) async fn delete_thing(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    api.store.delete_thing(&name, &caller).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Attach {
    #[serde(default)]
    exclusive: bool,
}

pub(super) async fn attach(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path((name, id)): Path<(String, String)>,
    Params(q): Params<Attach>,
) -> ApiResult {
    api.store
        .attach(&name, &cert_id(&id)?, q.exclusive, &caller)
        .await?;
    Ok(to_json(&api.store.thing(&name).await?))
}

pub(super) async fn detach(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult {
    api.store.detach(&name, &cert_id(&id)?, &caller).await?;
    Ok(to_json(&api.store.thing(&name).await?))
}
