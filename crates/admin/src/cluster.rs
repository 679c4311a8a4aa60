//! The cluster as the registry sees it: each node's heartbeat, how fresh its snapshot is, and
//! how far behind the newest change it is.

use axum::Json;
use axum::extract::State;
use serde_json::json;

use super::{Api, ApiResult};

/// A node silent for longer than this is shown as stale (milliseconds).
const STALE_MS: i64 = 10_000;

pub(super) async fn cluster_status(State(api): State<Api>) -> ApiResult {
    let newest = api.store.change_marker().await?;
    let now_ms = portcullis_registry::store::now_ms();
    let nodes: Vec<serde_json::Value> = api
        .store
        .cluster_nodes()
        .await?
        .into_iter()
        .map(|n| {
            let heartbeat_age_ms = (now_ms - n.heartbeat_ms).max(0);
            let mut v = serde_json::to_value(&n).unwrap_or_default();
            v["heartbeat_age_ms"] = json!(heartbeat_age_ms);
            v["snapshot_age_ms"] = json!((now_ms - n.snapshot_ms).max(0));
            v["changes_behind"] = json!((newest - n.snapshot_marker).max(0));
            v["stale"] = json!(heartbeat_age_ms > STALE_MS);
            v
        })
        .collect();
    Ok(Json(json!({"newest_change": newest, "nodes": nodes})))
}
