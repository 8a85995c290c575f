//! The daemon's Prometheus metrics (docs/observability.md lists them).
//!
//! Every labelled family is created with all its label values up front, so a
//! scrape shows every series from the start (a counter that is still 0 is
//! news too, and dashboards and alert rules never refer to a series that
//! does not exist yet).

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::publish::kafka::{PublishStats, Topics};

pub struct Metrics {
    registry: Registry,
    pub replication_sequence: IntGauge,
    pub replication_timestamp_seconds: Gauge,
    pub replication_lag_seconds: Gauge,
    pub last_diff_applied_timestamp_seconds: Gauge,
    pub diffs_applied_total: IntCounter,
    pub objects_changed_total: IntCounterVec,
    pub diff_apply_duration_seconds: Histogram,
    pub dirty_tiles: IntGauge,
    pub tiles_embedded_total: IntCounter,
    pub tiles_removed_total: IntCounter,
    pub embed_batch_duration_seconds: Histogram,
    pub outbox_entries: IntGauge,
    pub kafka_messages_delivered_total: IntCounterVec,
    pub kafka_messages_failed_total: IntCounterVec,
    pub broker_reachable: IntGauge,
    pub model_info: IntGaugeVec,
    pub tile_drift_cosine_distance: Histogram,
    pub drift_threshold: Gauge,
    pub drifted_tiles_ratio: Gauge,
    pub model_drift_mean_cosine_distance: Gauge,
    pub model_drift_mean_embedding_distance: Gauge,
    pub model_drift_mmd2: Gauge,
    pub finetune_runs_total: IntCounterVec,
    pub finetune_eval_score: GaugeVec,
    pub finetune_duration_seconds: Gauge,
    pub sweep_tiles_remaining: IntGauge,
    pub dead_letters_total: IntCounterVec,
    pub dead_letters_stored: IntGauge,
    pub change_records_truncated_total: IntCounter,
    pub replication_fetch_errors_total: IntCounter,
    pub replication_source_sequence: IntGauge,
    pub http_connections: IntGauge,
    pub http_connections_refused_total: IntCounter,
    pub http_requests_shed_total: IntCounterVec,
    topics: Topics,
    /// Publisher counters already turned into metric increments.
    seen: std::sync::Mutex<PublishStats>,
}

#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// Registers `m` in `r` and hands it back (the registry keeps a clone).
pub(crate) fn reg<T: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    m: T,
) -> Result<T, MetricsError> {
    r.register(Box::new(m.clone()))?;
    Ok(m)
}

/// A registry holding `osmvec_build_info` (the daemon's and the worker's).
pub(crate) fn registry_with_build_info(git_revision: &str) -> Result<Registry, MetricsError> {
    let r = Registry::new();
    let build = reg(
        &r,
        IntGaugeVec::new(
            Opts::new(
                "osmvec_build_info",
                "What is running: version and git revision.",
            ),
            &["version", "git_revision"],
        )?,
    )?;
    build
        .with_label_values(&[env!("CARGO_PKG_VERSION"), git_revision])
        .set(1);
    Ok(r)
}

/// `osmvec_model_info{model_version}` in `r` (the daemon's and the worker's).
pub(crate) fn model_info(r: &Registry) -> Result<IntGaugeVec, MetricsError> {
    reg(
        r,
        IntGaugeVec::new(
            Opts::new("osmvec_model_info", "The model version serving (value 1)."),
            &["model_version"],
        )?,
    )
}

/// The Prometheus text exposition of every metric in `r`.
pub(crate) fn render(r: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&r.gather(), &mut out)
        .expect("the text encoder writes to a Vec");
    String::from_utf8(out).expect("the text format is UTF-8")
}

/// Test helper: every family in `text` is `osmvec_*`, counters end in
/// `_total`, and docs/observability.md names it. Returns the family count.
#[cfg(test)]
pub(crate) fn check_families(text: &str) -> usize {
    let doc = include_str!("../../../docs/observability.md");
    let mut families = 0;
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line.split_whitespace().skip(2);
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        families += 1;
        assert!(name.starts_with("osmvec_"), "{name}");
        if kind == "counter" {
            assert!(name.ends_with("_total"), "{name}");
        }
        assert!(
            doc.contains(&format!("`{name}`")),
            "{name} is not documented in docs/observability.md"
        );
    }
    families
}

impl Metrics {
    pub fn new(topics: &Topics, git_revision: &str) -> Result<Metrics, MetricsError> {
        let registry = registry_with_build_info(git_revision)?;
        let r = &registry;
        let gauge = |name: &str, help: &str| reg(r, Gauge::new(name, help)?);
        let counter = |name: &str, help: &str| reg(r, IntCounter::new(name, help)?);
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            reg(
                r,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?,
            )
        };
        let seconds = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ];
        let m = Metrics {
            replication_sequence: reg(
                r,
                IntGauge::new(
                    "osmvec_replication_sequence",
                    "Sequence number of the last applied diff.",
                )?,
            )?,
            replication_timestamp_seconds: gauge(
                "osmvec_replication_timestamp_seconds",
                "Timestamp (Unix seconds) of the last applied diff's state.",
            )?,
            replication_lag_seconds: gauge(
                "osmvec_replication_lag_seconds",
                "Now minus the timestamp of the last applied diff's state.",
            )?,
            last_diff_applied_timestamp_seconds: gauge(
                "osmvec_last_diff_applied_timestamp_seconds",
                "Wall-clock time (Unix seconds) the last diff was applied; 0 before the first since start.",
            )?,
            diffs_applied_total: counter("osmvec_diffs_applied_total", "Diffs applied.")?,
            objects_changed_total: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "osmvec_objects_changed_total",
                        "OSM objects in applied diffs, by type and action.",
                    ),
                    &["type", "action"],
                )?,
            )?,
            diff_apply_duration_seconds: histogram(
                "osmvec_diff_apply_duration_seconds",
                "Download, parse and apply of one diff.",
                seconds.clone(),
            )?,
            dirty_tiles: reg(
                r,
                IntGauge::new("osmvec_dirty_tiles", "Tiles waiting to be embedded.")?,
            )?,
            tiles_embedded_total: counter(
                "osmvec_tiles_embedded_total",
                "Tile embeddings written.",
            )?,
            tiles_removed_total: counter(
                "osmvec_tiles_removed_total",
                "Tiles that lost their last feature (tombstones).",
            )?,
            embed_batch_duration_seconds: histogram(
                "osmvec_embed_batch_duration_seconds",
                "One encoder batch: graphs, forward pass and write.",
                seconds,
            )?,
            outbox_entries: reg(
                r,
                IntGauge::new(
                    "osmvec_outbox_entries",
                    "Outbox entries not yet acknowledged by the broker.",
                )?,
            )?,
            kafka_messages_delivered_total: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "osmvec_kafka_messages_delivered_total",
                        "Records acknowledged by the broker.",
                    ),
                    &["topic"],
                )?,
            )?,
            kafka_messages_failed_total: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "osmvec_kafka_messages_failed_total",
                        "Records whose delivery failed (they stay in the outbox and are sent again).",
                    ),
                    &["topic"],
                )?,
            )?,
            broker_reachable: reg(
                r,
                IntGauge::new(
                    "osmvec_broker_reachable",
                    "1 while the broker acknowledges records, 0 after failures or 5 s without an answer.",
                )?,
            )?,
            model_info: model_info(r)?,
            tile_drift_cosine_distance: histogram(
                "osmvec_tile_drift_cosine_distance",
                "Cosine distance of each re-embedded tile to its previous vector of the same model version.",
                vec![
                    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                ],
            )?,
            drift_threshold: gauge(
                "osmvec_drift_threshold",
                "Cosine distance above which a tile update counts as drifted.",
            )?,
            drifted_tiles_ratio: gauge(
                "osmvec_drifted_tiles_ratio",
                "Share of tile updates in the drift window whose drift exceeds the threshold.",
            )?,
            model_drift_mean_cosine_distance: gauge(
                "osmvec_model_drift_mean_cosine_distance",
                "Mean cosine distance between the location embeddings of the previous and current model version on the probe grid.",
            )?,
            model_drift_mean_embedding_distance: gauge(
                "osmvec_model_drift_mean_embedding_distance",
                "Euclidean distance between the mean probe-grid embeddings of the previous and current model version.",
            )?,
            model_drift_mmd2: gauge(
                "osmvec_model_drift_mmd2",
                "RBF-kernel MMD² (median-heuristic bandwidth) between the probe-grid embeddings of the previous and current model version.",
            )?,
            finetune_runs_total: reg(
                r,
                IntCounterVec::new(
                    Opts::new("osmvec_finetune_runs_total", "Fine-tuning runs by outcome."),
                    &["outcome"],
                )?,
            )?,
            finetune_eval_score: reg(
                r,
                GaugeVec::new(
                    Opts::new(
                        "osmvec_finetune_eval_score",
                        "Gate scores of the last fine-tuning run (NaN before the first).",
                    ),
                    &["model", "metric"],
                )?,
            )?,
            finetune_duration_seconds: gauge(
                "osmvec_finetune_duration_seconds",
                "Duration of the last fine-tuning run.",
            )?,
            sweep_tiles_remaining: reg(
                r,
                IntGauge::new(
                    "osmvec_sweep_tiles_remaining",
                    "Tiles still embedded by an older major version (the re-embed sweep).",
                )?,
            )?,
            dead_letters_total: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "osmvec_dead_letters_total",
                        "Records refused by the broker for good (size, invalid) or not buildable, by where they went: topic (the dead-letter topic acknowledged them) or store (it refused them too).",
                    ),
                    &["destination"],
                )?,
            )?,
            dead_letters_stored: reg(
                r,
                IntGauge::new(
                    "osmvec_dead_letters_stored",
                    "Dead letters kept in the store because the dead-letter topic refused them.",
                )?,
            )?,
            change_records_truncated_total: counter(
                "osmvec_change_records_truncated_total",
                "Change records cut to fit kafka.max_message_bytes (published with truncated: true).",
            )?,
            replication_fetch_errors_total: counter(
                "osmvec_replication_fetch_errors_total",
                "Failed requests to the replication source (each retry counts).",
            )?,
            replication_source_sequence: reg(
                r,
                IntGauge::new(
                    "osmvec_replication_source_sequence",
                    "Newest sequence the replication source announced (0 before its first answer).",
                )?,
            )?,
            http_connections: reg(
                r,
                IntGauge::new(
                    "osmvec_http_connections",
                    "Open connections to the HTTP side.",
                )?,
            )?,
            http_connections_refused_total: counter(
                "osmvec_http_connections_refused_total",
                "Connections closed at once because http.max_connections were open.",
            )?,
            http_requests_shed_total: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "osmvec_http_requests_shed_total",
                        "Requests answered 503 because their endpoint's concurrency cap was reached, by endpoint.",
                    ),
                    &["endpoint"],
                )?,
            )?,
            registry,
            topics: topics.clone(),
            seen: Default::default(),
        };
        for d in ["topic", "store"] {
            m.dead_letters_total.with_label_values(&[d]);
        }
        m.http_requests_shed_total.with_label_values(&["/v1/embed"]);
        for t in ["node", "way", "relation"] {
            for a in ["create", "modify", "delete"] {
                m.objects_changed_total.with_label_values(&[t, a]);
            }
        }
        for t in [
            &topics.embeddings,
            &topics.changes,
            &topics.models,
            &topics.jobs,
        ] {
            m.kafka_messages_delivered_total.with_label_values(&[t]);
            m.kafka_messages_failed_total.with_label_values(&[t]);
        }
        for o in ["promoted", "rejected", "failed"] {
            m.finetune_runs_total.with_label_values(&[o]);
        }
        for model in ["current", "candidate"] {
            for metric in ["retrieval_top10", "probe_macro_f1"] {
                m.finetune_eval_score
                    .with_label_values(&[model, metric])
                    .set(f64::NAN);
            }
        }
        for g in [
            &m.model_drift_mean_cosine_distance,
            &m.model_drift_mean_embedding_distance,
            &m.model_drift_mmd2,
            &m.finetune_duration_seconds,
        ] {
            g.set(f64::NAN);
        }
        Ok(m)
    }

    /// Turns the publisher's cumulative counters into metric increments.
    pub fn observe_publisher(&self, s: &PublishStats) {
        let t = &self.topics;
        let d = &self.kafka_messages_delivered_total;
        let f = &self.kafka_messages_failed_total;
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let prev = &*seen;
        d.with_label_values(&[&t.embeddings])
            .inc_by(s.delivered_tiles - prev.delivered_tiles);
        d.with_label_values(&[&t.changes]).inc_by(
            (s.delivered - s.delivered_tiles - s.delivered_jobs)
                - (prev.delivered - prev.delivered_tiles - prev.delivered_jobs),
        );
        d.with_label_values(&[&t.jobs])
            .inc_by(s.delivered_jobs - prev.delivered_jobs);
        f.with_label_values(&[&t.jobs])
            .inc_by(s.failed_jobs - prev.failed_jobs);
        d.with_label_values(&[&t.models])
            .inc_by(s.models_delivered - prev.models_delivered);
        f.with_label_values(&[&t.embeddings])
            .inc_by(s.failed_tiles - prev.failed_tiles);
        f.with_label_values(&[&t.changes]).inc_by(
            (s.failed - s.failed_tiles - s.failed_jobs)
                - (prev.failed - prev.failed_tiles - prev.failed_jobs),
        );
        self.dead_letters_total
            .with_label_values(&["topic"])
            .inc_by(s.dead_letters_topic - prev.dead_letters_topic);
        self.dead_letters_total
            .with_label_values(&["store"])
            .inc_by(s.dead_letters_store - prev.dead_letters_store);
        self.change_records_truncated_total
            .inc_by(s.changes_truncated - prev.changes_truncated);
        self.broker_reachable.set(i64::from(s.broker_reachable));
        *seen = s.clone();
    }

    /// Sets the lag from the last applied diff's timestamp (called at each
    /// scrape, so the lag grows while nothing is applied).
    pub fn refresh_lag(&self, now_unix: f64) {
        let ts = self.replication_timestamp_seconds.get();
        if ts > 0.0 {
            self.replication_lag_seconds.set((now_unix - ts).max(0.0));
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_exposed_from_the_start_with_conventional_names() {
        let m = Metrics::new(&Topics::default(), "abc").unwrap();
        let text = m.render();
        // Every family but osmvec_model_info (set when a model loads).
        assert_eq!(check_families(&text), 34);
        assert!(
            text.contains(r#"osmvec_objects_changed_total{action="delete",type="relation"} 0"#)
        );
        assert!(text.contains(r#"osmvec_kafka_messages_failed_total{topic="osmvec.models"} 0"#));
    }

    #[test]
    fn publisher_counters_become_increments() {
        let m = Metrics::new(&Topics::default(), "abc").unwrap();
        let mut s = PublishStats {
            delivered: 10,
            delivered_tiles: 4,
            failed: 3,
            failed_tiles: 1,
            models_delivered: 1,
            broker_reachable: true,
            ..Default::default()
        };
        m.observe_publisher(&s);
        s.delivered += 5;
        s.delivered_tiles += 5;
        m.observe_publisher(&s);
        let d = &m.kafka_messages_delivered_total;
        assert_eq!(d.with_label_values(&["osmvec.tile-embeddings"]).get(), 9);
        assert_eq!(d.with_label_values(&["osmvec.changes"]).get(), 6);
        assert_eq!(d.with_label_values(&["osmvec.models"]).get(), 1);
        let f = &m.kafka_messages_failed_total;
        assert_eq!(f.with_label_values(&["osmvec.changes"]).get(), 2);
        assert_eq!(m.broker_reachable.get(), 1);
    }
}
