//! What an `osmvec worker` shows of itself on `--http-listen`: its own
//! Prometheus metrics (docs/observability.md, "Workers"), `/healthz` and
//! `/readyz`. A worker has no store, so none of the daemon's replication,
//! outbox or drift families; `osmvec_build_info` and `osmvec_model_info` have
//! the daemon's names and labels, so one query covers both kinds of process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use serde_json::json;

use super::metrics::{MetricsError, model_info, reg, registry_with_build_info, render};

/// What happened to a job: each job read from the jobs topic counts once
/// (`revoked`: read, but its partition went to another worker before the
/// batch was published; the new owner embeds it).
pub const OUTCOMES: [&str; 6] = [
    "embedded",
    "removed",
    "superseded",
    "undecodable",
    "invalid",
    "revoked",
];

pub struct WorkerMetrics {
    registry: Registry,
    /// By outcome (`OUTCOMES`).
    pub jobs_total: IntCounterVec,
    pub job_bytes_total: IntCounter,
    pub batch_duration_seconds: Histogram,
    pub lag_jobs: IntGauge,
    pub assigned_partitions: IntGauge,
    pub offset_commit_failures_total: IntCounter,
    pub publish_failures_total: IntCounter,
    pub model_load_failures_total: IntCounter,
    pub last_batch_timestamp_seconds: Gauge,
    pub model_info: IntGaugeVec,
}

impl WorkerMetrics {
    pub fn new(git_revision: &str) -> Result<WorkerMetrics, MetricsError> {
        let registry = registry_with_build_info(git_revision)?;
        let r = &registry;
        let jobs_total = reg(
            r,
            IntCounterVec::new(
                Opts::new(
                    "osmvec_worker_jobs_total",
                    "Jobs read from the jobs topic, by outcome: embedded, removed (tombstone), superseded (a newer job of the tile), undecodable (not a job), invalid (a job that cannot be embedded: skipped), revoked (its partition moved mid-batch).",
                ),
                &["outcome"],
            )?,
        )?;
        for o in OUTCOMES {
            jobs_total.with_label_values(&[o]);
        }
        Ok(WorkerMetrics {
            jobs_total,
            job_bytes_total: reg(
                r,
                IntCounter::new(
                    "osmvec_worker_job_bytes_total",
                    "Encoded size of the jobs read.",
                )?,
            )?,
            batch_duration_seconds: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "osmvec_worker_batch_duration_seconds",
                        "One batch: decode, embed, publish and wait for every acknowledgement, commit.",
                    )
                    .buckets(vec![
                        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    ]),
                )?,
            )?,
            lag_jobs: reg(
                r,
                IntGauge::new(
                    "osmvec_worker_lag_jobs",
                    "Jobs in this worker's partitions not yet read (high watermark minus position), refreshed every 5 s.",
                )?,
            )?,
            assigned_partitions: reg(
                r,
                IntGauge::new(
                    "osmvec_worker_assigned_partitions",
                    "Partitions of the jobs topic the consumer group gave this worker.",
                )?,
            )?,
            offset_commit_failures_total: reg(
                r,
                IntCounter::new(
                    "osmvec_worker_offset_commit_failures_total",
                    "Offset commits refused (typically a rebalance moved the partition): that batch is redone by the new owner.",
                )?,
            )?,
            publish_failures_total: reg(
                r,
                IntCounter::new(
                    "osmvec_worker_publish_failures_total",
                    "Batches whose embeddings the broker did not acknowledge: the worker rewinds to the batch's offsets and redoes it after a delay.",
                )?,
            )?,
            model_load_failures_total: reg(
                r,
                IntCounter::new(
                    "osmvec_worker_model_load_failures_total",
                    "Failed loads of an announced model version (retried with backoff; the current version keeps serving).",
                )?,
            )?,
            last_batch_timestamp_seconds: reg(
                r,
                Gauge::new(
                    "osmvec_worker_last_batch_timestamp_seconds",
                    "Wall-clock time (Unix seconds) the last batch was committed; 0 before the first.",
                )?,
            )?,
            model_info: model_info(r)?,
            registry,
        })
    }

    /// Switches `osmvec_model_info` to `version`.
    pub fn set_model(&self, old: Option<&str>, version: &str) {
        if let Some(old) = old {
            let _ = self.model_info.remove_label_values(&[old]);
        }
        self.model_info.with_label_values(&[version]).set(1);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

/// What the worker loop shares with its HTTP side.
pub struct WorkerStatus {
    pub metrics: WorkerMetrics,
    pub group: String,
    pub model_version: RwLock<String>,
    /// The broker answered the last lag refresh.
    pub broker_answered: AtomicBool,
}

pub fn router(state: Arc<WorkerStatus>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route(
            "/healthz",
            get(|| async { axum::Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(readyz))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                axum::Json(json!({ "error": "no such endpoint" })),
            )
        })
        .with_state(state)
}

async fn metrics(State(s): State<Arc<WorkerStatus>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

/// Ready while the broker answers: a worker with no partition (more workers
/// than partitions) is ready, idle, and says so.
async fn readyz(State(s): State<Arc<WorkerStatus>>) -> Response {
    let ready = s.broker_answered.load(Ordering::Relaxed);
    let body = json!({
        "ready": ready,
        "group": s.group,
        "model_version": *s.model_version.read().unwrap_or_else(|e| e.into_inner()),
        "assigned_partitions": s.metrics.assigned_partitions.get(),
        "lag_jobs": s.metrics.lag_jobs.get(),
        "reason": (!ready).then_some("the broker did not answer the last metadata request"),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_exposed_from_the_start_and_documented() {
        let m = WorkerMetrics::new("abc").unwrap();
        m.set_model(None, "1.0");
        m.set_model(Some("1.0"), "1.1");
        let text = m.render();
        assert_eq!(super::super::metrics::check_families(&text), 11);
        for o in OUTCOMES {
            assert!(text.contains(&format!("osmvec_worker_jobs_total{{outcome=\"{o}\"}} 0")));
        }
        assert!(text.contains(r#"osmvec_model_info{model_version="1.1"} 1"#));
        assert!(!text.contains(r#"model_version="1.0""#));
    }
}
