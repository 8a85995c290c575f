//! The daemon's HTTP side (axum, on its own thread and tokio runtime so the
//! daemon loop never waits for a client): `/metrics`, health and readiness,
//! the query API and the drift page (docs/observability.md).
//!
//! Handlers read shared state only; the one thing they change is the pause
//! flag, behind a bearer token.
//!
//! The server is hyper's HTTP/1 connection driver on a plain accept loop, so
//! that a client cannot hold resources for ever ([`HttpLimits`]): request
//! headers must arrive within a timeout (which also closes a kept-alive
//! connection that stays idle that long), a connection lives at most a
//! bounded time, at most `max_connections` are open (more are closed at
//! once: under a 1,024 file-descriptor limit RocksDB needs the rest), and
//! `/v1/embed`, which computes, runs at most `embed_concurrency` at a time
//! (more wait up to a second, then get 503). `/v1/tiles` is paginated and
//! copies one page under the tile layer's lock.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

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
use osmvec_pipeline::checkpoint::Model;
use prometheus::{IntCounter, IntGauge};

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
    pub last_finetune: Mutex<Option<osmvec_pipeline::finetune::FinetuneReport>>,
    pub token: Option<String>,
    /// Ingest mode: workers embed and publish, nothing writes embeddings to
    /// this store, so the tile endpoints refuse rather than serve old ones.
    pub ingest_only: bool,
    /// Permits of `/v1/embed` (its concurrency cap).
    pub embed_slots: tokio::sync::Semaphore,
    /// Largest tile cover one `/v1/tiles.parquet` request may ask for.
    pub export_max_tiles: u64,
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
        .route("/v1/tiles.parquet", get(tiles_parquet))
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
    let gauges = ConnectionMetrics {
        open: state.metrics.http_connections.clone(),
        refused: state.metrics.http_connections_refused_total.clone(),
    };
    let local = serve_router_with(addr, router(state), HttpLimits::default(), Some(gauges))?;
    tracing::info!(address = %local, "serving /metrics, the API and the drift page");
    Ok(local)
}

/// What a client may hold of the HTTP side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// A request's line and headers must arrive within this, counted from
    /// when the server starts reading them: on a new connection, and after
    /// each response on a kept-alive one (so it is the idle timeout too).
    pub header_read_timeout: Duration,
    /// The longest a connection stays open, whatever it does (a client
    /// that reads a response a byte at a time).
    pub max_connection_age: Duration,
    /// Open connections at most; more are closed as soon as accepted.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_read_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(300),
            max_connections: 256,
        }
    }
}

/// `/v1/embed` requests computing at once (more wait, see [`embed`]).
pub const EMBED_CONCURRENCY: usize = 4;

/// The gauges a server keeps of its connections.
#[derive(Clone)]
pub struct ConnectionMetrics {
    pub open: IntGauge,
    pub refused: IntCounter,
}

/// Binds `addr` and serves `app` with the default [`HttpLimits`] (the
/// worker's HTTP side).
pub fn serve_router(addr: &str, app: Router) -> Result<SocketAddr> {
    serve_router_with(addr, app, HttpLimits::default(), None)
}

/// Binds `addr` and serves `app` on a thread with its own single-worker
/// tokio runtime, within `limits`.
pub fn serve_router_with(
    addr: &str,
    app: Router,
    limits: HttpLimits,
    gauges: Option<ConnectionMetrics>,
) -> Result<SocketAddr> {
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
                accept_loop(listener, app, limits, gauges).await;
            })
        })?;
    Ok(local)
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: HttpLimits,
    gauges: Option<ConnectionMetrics>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let mut warned = false;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors, say: wait instead of spinning.
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            if let Some(g) = &gauges {
                g.refused.inc();
            }
            if !warned {
                tracing::warn!(
                    max = limits.max_connections,
                    %peer,
                    "HTTP connection limit reached: closing new connections until some end"
                );
                warned = true;
            }
            drop(stream);
            continue;
        };
        warned = false;
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let gauges = gauges.clone();
        tokio::spawn(async move {
            if let Some(g) = &gauges {
                g.open.inc();
            }
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            match tokio::time::timeout(limits.max_connection_age, conn).await {
                Ok(Err(e)) => tracing::debug!(error = %e, %peer, "HTTP connection ended"),
                Err(_) => tracing::debug!(%peer, "HTTP connection closed at its age limit"),
                Ok(Ok(())) => {}
            }
            if let Some(g) = &gauges {
                g.open.dec();
            }
            drop(permit);
        });
    }
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

/// Rows per `/v1/tiles` page: the default and the most a client may ask.
pub const TILES_PAGE: usize = 10_000;
pub const TILES_PAGE_MAX: usize = 100_000;

/// `GET /v1/tiles[?after=z/x/y][&limit=N]`: one page of the tile layer in
/// tile order, with `next` (the `after` of the next page, null on the last)
/// and `total`. Only the page is copied under the lock, so a client never
/// holds up the daemon loop, which takes the lock after each batch.
async fn tiles(State(s): State<AppState>, Query(q): Query<HashMap<String, String>>) -> Response {
    if s.ingest_only {
        return ingest_only();
    }
    let after = match q.get("after").map(|a| {
        let p: Vec<&str> = a.split('/').collect();
        match p.as_slice() {
            [z, x, y] => parse_tile(z, x, y),
            _ => Err(format!("after must be z/x/y, got {a:?}")),
        }
    }) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, e),
    };
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => TILES_PAGE,
        Some(Ok(l)) if (1..=TILES_PAGE_MAX).contains(&l) => l,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("limit must be an integer 1..={TILES_PAGE_MAX}"),
            );
        }
    };
    let (page, total, more) = {
        let tiles = s.tiles.read().unwrap_or_else(|e| e.into_inner());
        let range = match after {
            Some(a) => tiles.range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => tiles.range(..),
        };
        let mut page: Vec<(TileId, TileState)> = Vec::with_capacity(limit.min(tiles.len()));
        let mut more = false;
        for (t, st) in range {
            if page.len() == limit {
                more = true;
                break;
            }
            page.push((*t, *st));
        }
        (page, tiles.len(), more)
    };
    let next = more.then(|| page.last().map(|(t, _)| t.to_string()));
    let rows: Vec<serde_json::Value> = page
        .iter()
        .map(|(t, st)| json!([t.z, t.x, t.y, st.drift, st.sequence]))
        .collect();
    axum::Json(
        json!({ "count": rows.len(), "total": total, "next": next.flatten(), "tiles": rows }),
    )
    .into_response()
}

/// `GET /v1/tiles.parquet?bbox=W,S,E,N[&format=parquet]`: the tile
/// embeddings of a region as GeoParquet (plain Parquet with
/// `format=parquet`), the same file `osmvec export-embeddings` writes,
/// streamed as it is written: the store is read on a blocking thread into a
/// bounded channel, so a large region costs the server a few row groups of
/// memory, not the whole answer. Regions whose tile cover exceeds
/// `export_max_tiles` are refused with 400; an empty one is 404.
/// The bbox and format of a `GET /v1/tiles.parquet`, or the 400 that says
/// what is wrong with them.
// A `Response` as the error: axum's own idiom for handlers' early returns;
// it is built once per request, never on a hot path.
#[allow(clippy::result_large_err)]
fn export_query(s: &AppState, q: &HashMap<String, String>) -> Result<([f64; 4], bool), Response> {
    let Some(b) = q.get("bbox") else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "bbox=W,S,E,N (degrees) is required",
        ));
    };
    let bbox = crate::export::parse_bbox(b).map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
    let geometry = match q.get("format").map(String::as_str) {
        None | Some("geoparquet") => true,
        Some("parquet") => false,
        Some(f) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("format must be geoparquet or parquet, got {f:?}"),
            ));
        }
    };
    let zoom = s.store.tile_config().fine_zoom;
    let cover = crate::export::tiles_in_cover(zoom, bbox);
    if cover > s.export_max_tiles {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!(
                "the bbox covers {cover} z{zoom} tiles, more than the {} one request may ask for \
                 (http.export_max_tiles): split the region, or run `osmvec export-embeddings` \
                 on the store",
                s.export_max_tiles
            ),
        ));
    }
    Ok((bbox, geometry))
}

/// The export's blocking half: reads the region twice in one snapshot,
/// first the survey (sent on `surveyed`: its answer decides between 404
/// and 200), then the rows into `tx`, which the response body drains.
fn stream_export(
    store: &Store,
    bbox: [f64; 4],
    geometry: bool,
    tx: tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>,
    surveyed: tokio::sync::oneshot::Sender<Result<u64, String>>,
) {
    let view = store.embedding_view();
    let survey = match crate::export::survey(&view, Some(bbox)) {
        Ok(sv) if sv.tiles > 0 => sv,
        Ok(_) => {
            let _ = surveyed.send(Ok(0));
            return;
        }
        Err(e) => {
            let _ = surveyed.send(Err(format!("{e:#}")));
            return;
        }
    };
    if surveyed.send(Ok(survey.tiles)).is_err() {
        return;
    }
    let meta = crate::export::tiles::ExportMeta {
        store_sequence: store
            .replication_state()
            .ok()
            .and_then(|r| r.0)
            .unwrap_or(0),
        zoom: store.tile_config().fine_zoom,
        bbox: Some(bbox),
    };
    // A failure mid-stream is sent as an error item: the body is then cut
    // without its last chunk, so the client sees a failed download rather
    // than a short file that looks complete.
    let abort = tx.clone();
    let result = crate::export::write_rows(
        &view,
        Some(bbox),
        &survey,
        geometry,
        meta,
        crate::export::ChannelWriter::new(tx),
        || {},
    )
    .and_then(|mut w| Ok(std::io::Write::flush(&mut w)?));
    if let Err(e) = result {
        let message = format!("{e:#}");
        tracing::warn!(error = %message, "GET /v1/tiles.parquet failed mid-stream");
        let _ = abort.blocking_send(Err(std::io::Error::other(message)));
    }
}

async fn tiles_parquet(
    State(s): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if s.ingest_only {
        return ingest_only();
    }
    let (bbox, geometry) = match export_query(&s, &q) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
    let (surveyed, survey_rx) = tokio::sync::oneshot::channel::<Result<u64, String>>();
    let store = s.store.clone();
    tokio::task::spawn_blocking(move || stream_export(&store, bbox, geometry, tx, surveyed));
    match survey_rx.await {
        Ok(Ok(0)) => {
            return error(
                StatusCode::NOT_FOUND,
                format!("no tile embeddings in bbox {}", q["bbox"]),
            );
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(_) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the export thread stopped",
            );
        }
    }
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    (
        [
            (header::CONTENT_TYPE, "application/vnd.apache.parquet"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"osmvec-tiles.parquet\"",
            ),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response()
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

/// How long a `/v1/embed` request waits for a free slot before 503.
const EMBED_WAIT: Duration = Duration::from_secs(1);

async fn embed(State(s): State<AppState>, Query(q): Query<HashMap<String, String>>) -> Response {
    let (lat, lon) = match parse_point(&q) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    // At most EMBED_CONCURRENCY computing at once: a flood of requests
    // waits briefly, then is shed, instead of queueing without bound on the
    // blocking pool.
    let _permit = match tokio::time::timeout(EMBED_WAIT, s.embed_slots.acquire()).await {
        Ok(Ok(p)) => p,
        _ => {
            s.metrics
                .http_requests_shed_total
                .with_label_values(&["/v1/embed"])
                .inc();
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many /v1/embed requests at once; retry shortly",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return r;
        }
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

    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Instant;

    fn test_server(limits: HttpLimits) -> SocketAddr {
        let app = Router::new().route("/", get(|| async { "ok" }));
        serve_router_with("127.0.0.1:0", app, limits, None).unwrap()
    }

    /// Reads until the server closes the connection (EOF or reset), at most
    /// `limit`; returns what came and whether it was closed.
    fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (String, bool) {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let t0 = Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while t0.elapsed() < limit {
            match s.read(&mut buf) {
                Ok(0) => return (String::from_utf8_lossy(&got).into(), true),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return (String::from_utf8_lossy(&got).into(), true),
            }
        }
        (String::from_utf8_lossy(&got).into(), false)
    }

    /// Defect 9 of issue 14: sockets that sent half a request line stayed
    /// open for ever (no header-read or idle timeout). With a 1 s header
    /// timeout, every one of them is closed, and so is a kept-alive
    /// connection left idle after its answer; a whole request is answered.
    #[test]
    fn half_requests_and_idle_connections_are_closed() {
        let addr = test_server(HttpLimits {
            header_read_timeout: Duration::from_secs(1),
            ..HttpLimits::default()
        });
        let mut half: Vec<TcpStream> = (0..50)
            .map(|_| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(b"GET / HT").unwrap();
                s
            })
            .collect();
        let mut idle = TcpStream::connect(addr).unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        // The wait is generous; without the timeout they never close.
        for s in &mut half {
            let (_, closed) = read_until_closed(s, Duration::from_secs(60));
            assert!(closed, "a half-request connection is still open");
        }
        let (answer, closed) = read_until_closed(&mut idle, Duration::from_secs(60));
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(closed, "an idle kept-alive connection is still open");
    }

    /// Connections beyond the cap are closed as soon as they are accepted;
    /// once others end, new ones are served again.
    #[test]
    fn connections_beyond_the_cap_are_closed_at_once() {
        let addr = test_server(HttpLimits {
            header_read_timeout: Duration::from_secs(300),
            max_connections: 4,
            ..HttpLimits::default()
        });
        let held: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
        // Let the server accept all four before the fifth comes.
        std::thread::sleep(Duration::from_millis(300));
        let mut extra = TcpStream::connect(addr).unwrap();
        let _ = extra.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let (answer, closed) = read_until_closed(&mut extra, Duration::from_secs(60));
        assert!(closed && answer.is_empty(), "{answer:?}");
        drop(held);
        let t0 = Instant::now();
        loop {
            let mut s = TcpStream::connect(addr).unwrap();
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let (answer, _) = read_until_closed(&mut s, Duration::from_secs(10));
            if answer.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "never served again");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A daemon's shared state over an empty store and an untrained model,
    /// served on a free port.
    fn test_daemon() -> (Arc<Shared>, SocketAddr, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path(), Default::default()).unwrap();
        let config = osmvec_pipeline::checkpoint::ModelConfig::new(3, 2);
        let device = osmvec_model::Device::Cpu;
        let model = Model::new(config, Default::default(), "1.0".into(), &device).unwrap();
        let shared = Arc::new(Shared {
            metrics: Metrics::new(&Default::default(), "test").unwrap(),
            store: Arc::new(store),
            model: RwLock::new(Arc::new(model)),
            drift: Mutex::new(DriftWindow::new(0.05, 3600.0)),
            model_drift: Mutex::new(None),
            tiles: RwLock::new(Default::default()),
            paused: AtomicBool::new(false),
            finetune_requested: AtomicBool::new(false),
            last_finetune: Mutex::new(None),
            token: None,
            ingest_only: false,
            embed_slots: tokio::sync::Semaphore::new(EMBED_CONCURRENCY),
            export_max_tiles: 1_000,
        });
        let addr = serve("127.0.0.1:0", shared.clone()).unwrap();
        (shared, addr, dir)
    }

    fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let r = agent.get(format!("http://{addr}{path}")).call().unwrap();
        let status = r.status().as_u16();
        (status, r.into_body().read_to_string().unwrap())
    }

    /// `/v1/embed` computes at most EMBED_CONCURRENCY at once: with every
    /// slot taken, a request waits its second and is shed with 503 (and
    /// counted); with a slot free it is answered.
    #[test]
    fn embed_requests_beyond_the_cap_are_shed() {
        let (shared, addr, _dir) = test_daemon();
        let (status, body) = http_get(addr, "/v1/embed?lat=4.2&lon=73.5");
        assert_eq!(status, 200, "{body}");
        let held = shared
            .embed_slots
            .try_acquire_many(EMBED_CONCURRENCY as u32)
            .unwrap();
        let (status, body) = http_get(addr, "/v1/embed?lat=4.2&lon=73.5");
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("too many /v1/embed requests"), "{body}");
        let shed = shared
            .metrics
            .http_requests_shed_total
            .with_label_values(&["/v1/embed"])
            .get();
        assert_eq!(shed, 1);
        drop(held);
        assert_eq!(http_get(addr, "/v1/embed?lat=4.2&lon=73.5").0, 200);
        // The connection gauge saw them (closed or kept alive, at most 3).
        assert!(shared.metrics.http_connections.get() <= 3);
    }

    #[test]
    fn tiles_come_in_pages() {
        let (shared, addr, _dir) = test_daemon();
        {
            let mut t = shared.tiles.write().unwrap();
            for x in 0..25 {
                t.insert(
                    TileId { z: 15, x, y: 7 },
                    TileState {
                        drift: None,
                        sequence: u64::from(x),
                    },
                );
            }
        }
        let mut rows = Vec::new();
        let mut after = String::new();
        let mut pages = 0;
        loop {
            let (status, body) = http_get(addr, &format!("/v1/tiles?limit=10{after}"));
            assert_eq!(status, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["total"], 25);
            pages += 1;
            rows.extend(
                v["tiles"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r[1].as_u64().unwrap()),
            );
            match v["next"].as_str() {
                Some(n) => after = format!("&after={n}"),
                None => break,
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(rows, (0..25).collect::<Vec<u64>>());
        assert_eq!(http_get(addr, "/v1/tiles?limit=0").0, 400);
        assert_eq!(http_get(addr, "/v1/tiles?after=15/x/7").0, 400);
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
