//! The daemon's HTTP side (axum, on its own thread and tokio runtime so the
//! daemon loop never waits for a client): `/metrics`, health and readiness,
//! the query API and the drift page (docs/observability.md).
//!
//! Handlers read shared state only; the one thing they change is the pause
//! flag, behind a bearer token.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use osmvec_graphstore::Store;
use osmvec_graphstore::tiles::TileId;
use serde_json::json;

use super::drift::{DriftWindow, ModelDrift};
use super::metrics::Metrics;
use crate::embedding::checkpoint::Model;

/// A tile's latest published state, kept in memory for the page's layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TileState {
    pub drift: Option<f32>,
    pub sequence: u64,
}

/// Everything the daemon loop shares with the HTTP side.
pub struct Shared {
    pub metrics: Metrics,
    pub store: Arc<Store>,
    pub model: RwLock<Arc<Model>>,
    pub drift: Mutex<DriftWindow>,
    pub model_drift: Mutex<Option<ModelDrift>>,
    pub tiles: RwLock<BTreeMap<TileId, TileState>>,
    /// Set by POST /v1/pause: the loop stops applying and embedding (it
    /// keeps publishing what is in the outbox).
    pub paused: AtomicBool,
    /// Set by POST /v1/finetune: the loop starts a run when none is going.
    pub finetune_requested: AtomicBool,
    pub last_finetune: Mutex<Option<crate::embedding::finetune::FinetuneReport>>,
    pub token: Option<String>,
    /// Ingest mode: workers embed and publish, nothing writes embeddings to
    /// this store, so the tile endpoints refuse rather than serve old ones.
    pub ingest_only: bool,
}

/// The tile endpoints' answer in ingest mode.
fn ingest_only() -> Response {
    error(
        StatusCode::CONFLICT,
        "this daemon runs in ingest mode: tile embeddings are computed by `osmvec worker`s \
         and published on the embeddings topic, not stored here (docs/scaling.md)",
    )
}

impl Shared {
    /// Loads the tile layer from the store's embeddings.
    pub fn load_tiles(&self) -> Result<()> {
        let mut tiles = BTreeMap::new();
        for (t, e) in self.store.tile_embeddings()? {
            tiles.insert(
                t,
                TileState {
                    drift: e.drift,
                    sequence: e.sequence,
                },
            );
        }
        *self.tiles.write().unwrap_or_else(|e| e.into_inner()) = tiles;
        Ok(())
    }
}

type AppState = Arc<Shared>;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Wall-clock Unix seconds (0 if the clock is before 1970).
pub fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The router; public for tests that serve it on their own listener.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/assets/{*path}", get(asset))
        .route("/metrics", get(metrics))
        .route(
            "/healthz",
            get(|| async { axum::Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(readyz))
        .route("/v1/tiles", get(tiles))
        .route("/v1/tiles/{z}/{x}/{y}", get(tile))
        .route("/v1/embed", get(embed))
        .route("/v1/drift", get(drift))
        .route("/v1/pause", post(pause))
        .route("/v1/resume", post(resume))
        .route("/v1/finetune", post(request_finetune))
        .route("/v1/model", get(model_info))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(state)
}

/// Binds `addr` (fails here, at start, when it is taken) and serves the
/// daemon's router on a thread of its own until the process exits.
pub fn serve(addr: &str, state: AppState) -> Result<SocketAddr> {
    let local = serve_router(addr, router(state))?;
    tracing::info!(address = %local, "serving /metrics, the API and the drift page");
    Ok(local)
}

/// Binds `addr` and serves `app` on a thread with its own single-worker
/// tokio runtime (the daemon and the worker share this).
pub fn serve_router(addr: &str, app: Router) -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen on {addr} (http.listen / --http-listen)"))?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("osmvec-http")
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    std::thread::Builder::new()
        .name("osmvec-http".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "HTTP listener");
                        return;
                    }
                };
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "HTTP server stopped");
                }
            })
        })?;
    Ok(local)
}

// The drift page and its assets, compiled in (daemon/assets).
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/style.css"),
    ),
    (
        "vendor/leaflet/leaflet.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/vendor/leaflet/leaflet.js"),
    ),
    (
        "vendor/leaflet/leaflet.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/vendor/leaflet/leaflet.css"),
    ),
];

async fn page() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("../../assets/index.html"),
    )
}

async fn asset(Path(path): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, ..)| *name == path) {
        Some((_, mime, bytes)) => ([(header::CONTENT_TYPE, *mime)], *bytes).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no asset {path}")),
    }
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    s.metrics.refresh_lag(now_unix());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn readyz(State(s): State<AppState>) -> Response {
    let store = s.store.replication_state().is_ok();
    let model = s
        .metrics
        .model_info
        .get_metric_with_label_values(&[&s
            .model
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .meta
            .model_version])
        .is_ok_and(|g| g.get() == 1);
    let broker = s.metrics.broker_reachable.get() == 1;
    let ready = store && model && broker;
    let body = json!({
        "ready": ready,
        "checks": { "store": store, "model": model, "broker": broker },
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn tiles(State(s): State<AppState>) -> Response {
    if s.ingest_only {
        return ingest_only();
    }
    let tiles = s.tiles.read().unwrap_or_else(|e| e.into_inner());
    let rows: Vec<serde_json::Value> = tiles
        .iter()
        .map(|(t, st)| json!([t.z, t.x, t.y, st.drift, st.sequence]))
        .collect();
    axum::Json(json!({ "count": rows.len(), "tiles": rows })).into_response()
}

/// Parses `z/x/y` path segments: integers, z ≤ 30, x and y < 2^z.
pub fn parse_tile(z: &str, x: &str, y: &str) -> Result<TileId, String> {
    let z: u8 = z
        .parse()
        .map_err(|_| format!("z must be an integer 0..=30, got {z:?}"))?;
    if z > 30 {
        return Err(format!("z must be an integer 0..=30, got {z}"));
    }
    let n = 1u64 << z;
    let coord = |name: &str, v: &str| -> Result<u32, String> {
        v.parse::<u64>()
            .ok()
            .filter(|c| *c < n)
            .map(|c| c as u32)
            .ok_or_else(|| format!("{name} must be an integer 0..{n} at zoom {z}, got {v:?}"))
    };
    Ok(TileId {
        z,
        x: coord("x", x)?,
        y: coord("y", y)?,
    })
}

async fn tile(
    State(s): State<AppState>,
    Path((z, x, y)): Path<(String, String, String)>,
) -> Response {
    let t = match parse_tile(&z, &x, &y) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if s.ingest_only {
        return ingest_only();
    }
    match s.store.tile_embedding(t) {
        Ok(Some(e)) => axum::Json(json!({
            "tile": t.to_string(),
            "z": t.z, "x": t.x, "y": t.y,
            "model_version": e.model_version,
            "sequence": e.sequence,
            "computed_at": crate::publish::messages::rfc3339(e.computed_at),
            "drift": e.drift,
            "dim": e.vector.len(),
            "vector": e.vector,
        }))
        .into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no embedding for tile {t}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

/// Parses `lat` and `lon` query parameters: present, numeric, in range.
pub fn parse_point(q: &HashMap<String, String>) -> Result<(f64, f64), String> {
    let get = |name: &str, limit: f64| -> Result<f64, String> {
        let raw = q
            .get(name)
            .ok_or_else(|| format!("missing query parameter {name}"))?;
        let v: f64 = raw
            .trim()
            .parse()
            .map_err(|_| format!("{name} must be a number, got {raw:?}"))?;
        if !v.is_finite() || v.abs() > limit {
            return Err(format!(
                "{name} must be between -{limit} and {limit}, got {raw}"
            ));
        }
        Ok(v)
    };
    Ok((get("lat", 90.0)?, get("lon", 180.0)?))
}

async fn embed(State(s): State<AppState>, Query(q): Query<HashMap<String, String>>) -> Response {
    let (lat, lon) = match parse_point(&q) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let model = s.model.read().unwrap_or_else(|e| e.into_inner()).clone();
    let result = tokio::task::spawn_blocking(move || -> Result<(String, Vec<f32>)> {
        let v = model
            .location
            .forward(&[(lat, lon)])?
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok((model.meta.model_version.clone(), v))
    })
    .await;
    match result {
        Ok(Ok((version, v))) => axum::Json(json!({
            "lat": lat, "lon": lon, "model_version": version, "dim": v.len(), "vector": v,
        }))
        .into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn drift(State(s): State<AppState>) -> Response {
    let (summary, series) = {
        let mut w = lock(&s.drift);
        (w.summary(now_unix()), w.series())
    };
    let version = s
        .model
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .meta
        .model_version
        .clone();
    let mut body = serde_json::to_value(summary).unwrap_or_default();
    body["model_version"] = json!(version);
    body["model_drift"] = json!(*lock(&s.model_drift));
    body["paused"] = json!(s.paused.load(Ordering::Relaxed));
    body["series"] = json!(series);
    axum::Json(body).into_response()
}

/// 401 without a bearer token, 403 with a wrong one or when none is
/// configured.
fn authorize(s: &Shared, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(given) = given else {
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "this endpoint needs Authorization: Bearer <token>",
        )));
    };
    match &s.token {
        Some(t) if constant_time_eq(t.as_bytes(), given.as_bytes()) => Ok(()),
        Some(_) => Err(Box::new(error(StatusCode::FORBIDDEN, "wrong token"))),
        None => Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "no token configured (http.token / --http-token): state changes are disabled",
        ))),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn pause(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return *r;
    }
    s.paused.store(true, Ordering::Relaxed);
    tracing::info!("paused through the API");
    axum::Json(json!({ "paused": true })).into_response()
}

async fn resume(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return *r;
    }
    s.paused.store(false, Ordering::Relaxed);
    tracing::info!("resumed through the API");
    axum::Json(json!({ "paused": false })).into_response()
}

async fn request_finetune(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&s, &headers) {
        return *r;
    }
    s.finetune_requested.store(true, Ordering::Relaxed);
    tracing::info!("fine-tuning requested through the API");
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({ "finetune": "requested" })),
    )
        .into_response()
}

async fn model_info(State(s): State<AppState>) -> Response {
    let m = s.model.read().unwrap_or_else(|e| e.into_inner()).clone();
    axum::Json(json!({
        "model_version": m.meta.model_version,
        "created_at": m.meta.created_at,
        "training_steps": m.meta.training.steps,
        "git_revision": m.meta.git_revision,
        "last_finetune": *lock(&s.last_finetune),
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_and_point_parameters_are_checked() {
        assert_eq!(
            parse_tile("15", "23000", "14000").unwrap(),
            TileId {
                z: 15,
                x: 23000,
                y: 14000
            }
        );
        assert!(parse_tile("99", "0", "0").unwrap_err().contains("z must"));
        assert!(parse_tile("2", "4", "0").unwrap_err().contains("x must"));
        assert!(parse_tile("2", "0", "-1").unwrap_err().contains("y must"));
        let q = |lat: &str, lon: &str| {
            HashMap::from([
                ("lat".to_string(), lat.to_string()),
                ("lon".to_string(), lon.to_string()),
            ])
        };
        assert_eq!(parse_point(&q("4.2", "73.5")).unwrap(), (4.2, 73.5));
        assert!(
            parse_point(&q("91", "0"))
                .unwrap_err()
                .contains("lat must be between")
        );
        assert!(
            parse_point(&q("0", "abc"))
                .unwrap_err()
                .contains("lon must be a number")
        );
        assert!(parse_point(&q("NaN", "0")).is_err());
        assert!(
            parse_point(&HashMap::new())
                .unwrap_err()
                .contains("missing")
        );
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
