//! The web console at `/ui` on the admin listener.
//!
//! The page, script and style sheet are embedded in the binary (`crates/admin/console/`,
//! plain HTML, CSS and JavaScript: no build step, nothing fetched at run time) and carry no
//! data; everything the console shows comes from the admin API, authenticated as any admin
//! request: the admin client certificate in the browser, or a session made by logging in with an
//! API token. A session is a random 256-bit id in a `Secure; HttpOnly; SameSite=Strict` cookie,
//! ends after 30 minutes idle or 8 hours, and comes with a CSRF token that every state-changing
//! request must echo in `X-CSRF-Token`. Independently of how a request is authenticated, a
//! state-changing request a browser marks as cross-site (`Sec-Fetch-Site`, or an `Origin` that is
//! not this listener) is refused: a browser holding the admin certificate cannot be used by
//! another site either.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;

use super::{Api, ApiError, Body, PeerCertificate};

/// The session cookie's name.
pub(crate) const COOKIE: &str = "portcullis_console";
/// The header a console request carries its CSRF token in.
pub(crate) const CSRF_HEADER: &str = "x-csrf-token";
const IDLE: Duration = Duration::from_secs(30 * 60);
const LIFETIME: Duration = Duration::from_secs(8 * 3600);
const MAX_SESSIONS: usize = 1000;

const INDEX_HTML: &str = include_str!("../console/index.html");
const APP_JS: &str = include_str!("../console/app.js");
const APP_CSS: &str = include_str!("../console/app.css");

/// Console sessions, in memory (a restart logs everybody out).
#[derive(Default)]
pub(crate) struct Sessions(Mutex<HashMap<String, Session>>);

struct Session {
    caller: String,
    csrf: String,
    created: Instant,
    last: Instant,
}

/// Why a session cookie does not authenticate.
pub(crate) enum SessionError {
    Expired,
    Unknown,
}

impl Sessions {
    fn create(&self, caller: String) -> (String, String) {
        let id = random_hex();
        let csrf = random_hex();
        let now = Instant::now();
        if let Ok(mut map) = self.0.lock() {
            map.retain(|_, s| alive(s, now));
            if map.len() >= MAX_SESSIONS {
                // The least recently used goes.
                if let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, s)| s.last)
                    .map(|(k, _)| k.clone())
                {
                    map.remove(&oldest);
                }
            }
            map.insert(
                id.clone(),
                Session {
                    caller,
                    csrf: csrf.clone(),
                    created: now,
                    last: now,
                },
            );
        }
        (id, csrf)
    }

    /// The caller and CSRF token of a live session, refreshing its idle time.
    pub(crate) fn check(&self, id: &str) -> Result<(String, String), SessionError> {
        let now = Instant::now();
        let mut map = self.0.lock().map_err(|_| SessionError::Unknown)?;
        match map.get_mut(id) {
            Some(s) if alive(s, now) => {
                s.last = now;
                Ok((s.caller.clone(), s.csrf.clone()))
            }
            Some(_) => {
                map.remove(id);
                Err(SessionError::Expired)
            }
            None => Err(SessionError::Unknown),
        }
    }

    fn remove(&self, id: &str) {
        if let Ok(mut map) = self.0.lock() {
            map.remove(id);
        }
    }
}

fn alive(s: &Session, now: Instant) -> bool {
    now.duration_since(s.last) < IDLE && now.duration_since(s.created) < LIFETIME
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    // The system's generator failing is not something to carry on after.
    aws_lc_rs::rand::fill(&mut bytes).unwrap_or_else(|_| std::process::abort());
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The session id in the request's cookie, if any.
pub(crate) fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
        .filter(|v| !v.is_empty())
}

/// Refuses a state-changing request a browser made from another site.
pub(crate) fn cross_site(method: &Method, headers: &HeaderMap) -> Option<ApiError> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    let refuse = || {
        Some(ApiError::new(
            StatusCode::FORBIDDEN,
            "cross-site-request",
            "a state-changing request from another site is refused; use the console or the API directly",
        ))
    };
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && site != "same-origin"
        && site != "none"
    {
        return refuse();
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        // The admin API speaks only HTTPS: an `http://` origin is another origin (and one a
        // network attacker can serve), even with the same host.
        let origin_host = origin.strip_prefix("https://").unwrap_or("");
        if origin_host.is_empty() || !origin_host.eq_ignore_ascii_case(host) {
            return refuse();
        }
    }
    None
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

pub(crate) async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

pub(crate) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

pub(crate) async fn style() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Login {
    token: String,
}

/// `POST /ui/login {"token": …}`: a session for a valid API token.
pub(crate) async fn login(
    State(api): State<Api>,
    headers: HeaderMap,
    Body(Login { token }): Body<Login>,
) -> Response {
    if let Some(e) = cross_site(&Method::POST, &headers) {
        return e.into_response();
    }
    let record = match api.store.token_by_secret(token.trim()).await {
        Ok(Some(t)) => t,
        Ok(None) => {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid-token",
                "the token is not valid (unknown or deleted); make one with `portcullis admin token create`",
            )
            .into_response();
        }
        Err(e) => return ApiError::from(e).into_response(),
    };
    let caller = format!("console:{}", record.name);
    let (id, csrf) = api.sessions.create(caller.clone());
    tracing::info!(target: "portcullis::admin", caller, "console login");
    let mut resp = Json(json!({"caller": caller, "csrf": csrf})).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}",
        LIFETIME.as_secs()
    )) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// `GET /ui/session`: who the console is signed in as, and its CSRF token; 401 otherwise.
pub(crate) async fn session(
    State(api): State<Api>,
    peer: Option<Extension<PeerCertificate>>,
    headers: HeaderMap,
) -> Response {
    if let Some(id) = session_cookie(&headers) {
        match api.sessions.check(id) {
            Ok((caller, csrf)) => {
                return Json(json!({"caller": caller, "csrf": csrf})).into_response();
            }
            Err(SessionError::Expired) => return expired().into_response(),
            Err(SessionError::Unknown) => {}
        }
    }
    let peer = peer.and_then(|Extension(p)| p.0);
    match api.admin_caller(peer.as_ref()).await {
        // The certificate authenticates every request itself; no CSRF token is needed (the
        // cross-site check applies), but the console sends one anyway.
        Ok(Some(caller)) => return Json(json!({"caller": caller, "csrf": ""})).into_response(),
        Ok(None) => {}
        Err(e) => return e.into_response(),
    }
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "sign in with an API token, or present the admin client certificate",
    )
    .into_response()
}

/// `POST /ui/logout`: ends the session and clears the cookie.
pub(crate) async fn logout(State(api): State<Api>, req: Request) -> Response {
    if let Some(e) = cross_site(req.method(), req.headers()) {
        return e.into_response();
    }
    if let Some(id) = session_cookie(req.headers()) {
        api.sessions.remove(id);
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "portcullis_console=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    resp
}

pub(crate) fn expired() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "session-expired",
        "the console session expired; sign in again",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_end_when_idle_or_old_and_cookies_are_read_strictly() {
        let sessions = Sessions::default();
        let (id, csrf) = sessions.create("console:ops".into());
        assert_eq!(id.len(), 64);
        assert_ne!(id, csrf);
        assert!(matches!(sessions.check(&id), Ok((c, t)) if c == "console:ops" && t == csrf));
        assert!(matches!(sessions.check("nope"), Err(SessionError::Unknown)));
        // Idle past the limit: expired (and forgotten).
        if let Ok(mut map) = sessions.0.lock()
            && let Some(s) = map.get_mut(&id)
            && let Some(past) = Instant::now().checked_sub(IDLE + Duration::from_secs(1))
        {
            s.last = past;
        }
        assert!(matches!(sessions.check(&id), Err(SessionError::Expired)));
        assert!(matches!(sessions.check(&id), Err(SessionError::Unknown)));
        // Older than the lifetime, however busy: expired.
        let (id, _) = sessions.create("console:ops".into());
        if let Ok(mut map) = sessions.0.lock()
            && let Some(s) = map.get_mut(&id)
            && let Some(past) = Instant::now().checked_sub(LIFETIME + Duration::from_secs(1))
        {
            s.created = past;
        }
        assert!(matches!(sessions.check(&id), Err(SessionError::Expired)));

        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; portcullis_console=abc ; b=2"),
        );
        assert_eq!(session_cookie(&headers), Some("abc"));
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("xportcullis_console=abc"),
        );
        assert_eq!(session_cookie(&headers), None);
    }

    #[test]
    fn cross_site_state_changes_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:9443"));
        assert!(
            cross_site(&Method::POST, &h).is_none(),
            "no browser headers: the CLI"
        );
        h.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://127.0.0.1:9443"),
        );
        assert!(cross_site(&Method::POST, &h).is_none());
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(cross_site(&Method::POST, &h).is_some());
        assert!(
            cross_site(&Method::GET, &h).is_none(),
            "reads are not state changes"
        );
        h.remove("sec-fetch-site");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.test"),
        );
        assert!(cross_site(&Method::DELETE, &h).is_some());
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(cross_site(&Method::PATCH, &h).is_some());
    }

    #[test]
    fn an_origin_with_another_scheme_is_cross_site() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:9443"));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:9443"),
        );
        assert!(cross_site(&Method::POST, &h).is_some());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://127.0.0.1:9443"),
        );
        assert!(cross_site(&Method::POST, &h).is_none());
    }
}
