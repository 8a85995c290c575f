//! The publish stage: the outbox drained to Kafka (acknowledged entries
//! leave it), model events announced, the broker's reachability watched;
//! at the stop, in-flight records get `shutdown_flush` to be acknowledged.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use osmvec_graphstore::Store;
use osmvec_pipeline::checkpoint::Model;
use osmvec_pipeline::embed::EmbedReport;
use osmvec_pipeline::jobs::TileJob;

use super::{CycleReport, RunOptions};
use crate::config::Mode;
use crate::observe::metrics::Metrics;
use crate::publish::kafka::{DrainReport, Publisher};
use crate::publish::messages::{ModelMessage, longest_tile_record, rfc3339};

pub(super) struct Publish {
    publisher: Publisher,
    max_per_drain: usize,
    shutdown_flush: Duration,
    brokers: String,
    /// Dead letters kept in the store, as last counted.
    dead_stored_seen: i64,
    broker_warned: bool,
}

impl Publish {
    /// The producer, checked against the model's record size; in ingest
    /// mode with the job builder, in embed mode after turning an earlier
    /// ingest run's queued jobs back into dirty tiles; then the `loaded`
    /// model event.
    pub(super) fn start(o: &RunOptions, store: &Store, model: &Model) -> Result<Publish> {
        // An embedding record has a fixed shape (the model's output width), so
        // its largest size is known now: one that cannot fit the record size
        // is a configuration error at start, never a record refused later.
        let longest = longest_tile_record(
            o.kafka.encoding,
            model.meta.config.graph.out_dim,
            &model.meta.model_version,
        )?;
        if longest + 4096 > o.kafka.max_message_bytes {
            anyhow::bail!(
                "kafka.max_message_bytes = {} cannot hold this model's embedding records (up to {longest} bytes plus headers); raise it",
                o.kafka.max_message_bytes
            );
        }
        let mut publisher = Publisher::new(&o.kafka)?;
        if o.mode == Mode::Ingest {
            let (cfg, policy) = (model.meta.config.graphs, model.meta.config.tags.clone());
            publisher.set_job_builder(Box::new(move |store, tile| {
                let job = TileJob::build(store, tile, &cfg, &policy)?;
                Ok((job.encode()?, job.seq))
            }))?;
            tracing::info!(topic = %o.kafka.topics.jobs, "ingest mode: dirty tiles become jobs for osmvec worker");
        } else {
            // Jobs queued by an earlier run in ingest mode are tiles this
            // process must embed now.
            let n = store.jobs_to_dirty_marks()?;
            if n > 0 {
                tracing::info!(
                    tiles = n,
                    "job entries of an earlier ingest run are dirty tiles again"
                );
            }
        }
        let mut p = Publish {
            publisher,
            max_per_drain: o.max_outbox_per_drain,
            shutdown_flush: o.shutdown_flush,
            brokers: o.kafka.brokers.clone(),
            dead_stored_seen: 0,
            broker_warned: false,
        };
        p.announce(model, "loaded", &o.checkpoint)?;
        Ok(p)
    }

    /// Queues a models-topic event about `model` (sent by the next drain).
    pub(super) fn announce(&mut self, model: &Model, event: &str, checkpoint: &Path) -> Result<()> {
        self.publisher
            .announce_model(&model_message(model, event, checkpoint))
    }

    /// Drains the outbox, waiting longer for acknowledgements after a cycle
    /// that applied or embedded something.
    pub(super) fn step(
        &mut self,
        store: &Store,
        m: &Metrics,
        er: &EmbedReport,
        cycle: &mut CycleReport,
    ) -> Result<DrainReport> {
        let wait = if cycle.diffs_applied > 0 || er.tiles > 0 {
            Duration::from_millis(500)
        } else {
            Duration::from_millis(100)
        };
        let dr = self.publisher.drain(store, self.max_per_drain, wait)?;
        cycle.published = dr.delivered;
        cycle.publish_failed = dr.failed;
        if er.drifted > 0 {
            cycle.drift_mean = Some(er.drift_sum / er.drifted as f64);
            cycle.drift_max = er.drift_max;
        }
        cycle.drifted = er.drifted;
        m.dirty_tiles.set(cycle.dirty_left as i64);
        let stats = &self.publisher.stats;
        if dr.dead_lettered > 0 || stats.dead_letters_store as i64 != self.dead_stored_seen {
            self.dead_stored_seen = stats.dead_letters_store as i64;
            m.dead_letters_stored.set(store.dead_letters_len()? as i64);
        }
        m.observe_publisher(stats);
        Ok(dr)
    }

    /// One warning when the broker becomes unreachable, one line when it
    /// is back.
    pub(super) fn watch_broker(&mut self, store: &Store) -> Result<()> {
        if !self.publisher.stats.broker_reachable {
            if !self.broker_warned {
                tracing::warn!(
                    brokers = %self.brokers,
                    outbox = store.outbox_len()?,
                    "broker unreachable: the outbox holds the updates until it returns"
                );
                self.broker_warned = true;
            }
        } else if self.broker_warned {
            tracing::info!("broker reachable again; draining the outbox");
            self.broker_warned = false;
        }
        Ok(())
    }

    /// Nothing in flight and no model event waiting.
    pub(super) fn settled(&self) -> bool {
        self.publisher.in_flight() == 0 && !self.publisher.model_event_pending()
    }

    /// At the stop: in-flight records get up to `shutdown_flush` to be
    /// acknowledged (what is not stays in the outbox); a broker known to
    /// be down gets no wait. Then the last statistics and the stop line.
    pub(super) fn finish(&mut self, store: &Store, m: &Metrics, o: &RunOptions) -> Result<()> {
        let p = &mut self.publisher;
        let deadline = Instant::now() + self.shutdown_flush;
        while p.in_flight() > 0 && p.stats.broker_reachable && Instant::now() < deadline {
            p.drain(store, 0, Duration::from_millis(200))?;
        }
        m.observe_publisher(&p.stats);
        if let Some(ms) = o
            .kafka
            .properties
            .get("statistics.interval.ms")
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|ms| *ms > 0 && *ms <= 10_000)
        {
            // One more statistics report, so the figures include the last
            // deliveries: bytes on the wire per topic beside the payload bytes
            // (what a `compression.type` buys).
            p.poll_for(Duration::from_millis(ms + 100));
            let wire = serde_json::json!({
                "producers": p.wire(),
                "payload_bytes": p.stats.payload_bytes,
            });
            tracing::info!(wire = %wire, "bytes sent (librdkafka statistics)");
        }
        tracing::info!(
            delivered = p.stats.delivered,
            failed = p.stats.failed,
            outbox = store.outbox_len()?,
            sequence = ?store.replication_state()?.0,
            "daemon stopped"
        );
        Ok(())
    }
}

/// A models-topic event about `model`.
fn model_message(model: &Model, event: &str, checkpoint: &Path) -> ModelMessage {
    ModelMessage {
        schema_version: crate::publish::messages::SCHEMA_VERSION,
        event: event.into(),
        model_version: model.meta.model_version.clone(),
        checkpoint: checkpoint.display().to_string(),
        created_at: model.meta.created_at.clone(),
        git_revision: model.meta.git_revision.clone(),
        training_steps: model.meta.training.steps,
        eval: model.meta.eval.clone(),
        at: rfc3339(chrono::Utc::now().timestamp()),
    }
}
