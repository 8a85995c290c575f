//! `osmvec run`: the streaming daemon. One thread, one loop:
//!
//! 1. apply the next published diff, if any (the replication loop of
//!    `follow`, one diff at a time; change records enter the outbox in the
//!    diff's own write batch);
//! 2. embed up to `max_tiles_per_cycle` dirty tiles, oldest mark first, in
//!    encoder batches; each batch's embeddings, cleared marks and outbox
//!    entries are one write batch;
//! 3. drain the outbox to Kafka (acknowledged entries leave the outbox).
//!
//! When there is nothing to apply, embed or send, it sleeps `poll_interval`
//! (or exits with `--until-caught-up`). Broker down: deliveries fail or wait,
//! the outbox grows (at most one entry per tile plus unsent change records)
//! while steps 1 and 2 go on; a warning says so, and the outbox drains when
//! the broker returns. SIGTERM/SIGINT: the current step finishes, the
//! publisher flushes for up to `shutdown_flush`, exit 0. A crash anywhere
//! resumes from the store: its sequence, its dirty marks, its outbox.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use osmvec_graphstore::Store;
use osmvec_graphstore::embeddings::DirtyMark;
use osmvec_graphstore::read::OscOptions;
use osmvec_graphstore::tiles::TileId;
use osmvec_model::Device;
use serde::Serialize;

use crate::embedding::checkpoint::Model;
use crate::embedding::embed::{EmbedReport, embed_tiles, tiles_to_embed};
use crate::embedding::inputs::Inputs;
use crate::embedding::tags::TagVectors;
use crate::follow::{FollowOptions, follow};
use crate::publish::kafka::{KafkaConfig, Publisher};
use crate::publish::messages::{ModelMessage, rfc3339};
use crate::replication::{Backoff, SourceOptions, open_source};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub store: PathBuf,
    pub source: String,
    pub checkpoint: PathBuf,
    pub kafka: KafkaConfig,
    pub until_caught_up: bool,
    pub poll_interval: Duration,
    pub embed_batch: usize,
    pub max_tiles_per_cycle: usize,
    pub max_outbox_per_drain: usize,
    pub shutdown_flush: Duration,
    pub backoff: Backoff,
    pub osc: OscOptions,
    pub model_dir: PathBuf,
    pub device: Device,
    /// Print one JSON line per cycle that did something on stdout.
    pub json: bool,
}

/// One line per cycle that did something.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CycleReport {
    pub sequence: Option<u64>,
    pub diffs_applied: u64,
    pub tiles_embedded: usize,
    pub tiles_removed: usize,
    pub dirty_left: usize,
    pub published: usize,
    pub publish_failed: usize,
    pub outbox: u64,
    /// Drift of the tiles re-embedded in this cycle (same model version).
    pub drift_mean: Option<f64>,
    pub drift_max: Option<f64>,
    /// From the start of the cycle to the end of its drain.
    pub seconds: f64,
}

pub fn run(o: &RunOptions, stop: Arc<AtomicBool>) -> Result<()> {
    let store = Store::open(&o.store)?;
    store.ensure_consistent()?;
    store.set_outbox_enabled(true)?;
    let model = Model::load(&o.checkpoint, &o.device)?;
    let source = open_source(&o.source, &SourceOptions::default())
        .with_context(|| format!("cannot open replication source {}", o.source))?;
    let mut publisher = Publisher::new(&o.kafka)?;
    publisher
        .ensure_topics(Duration::from_secs(10))
        .with_context(|| format!("is the broker at {} up?", o.kafka.brokers))?;
    let now = chrono::Utc::now().timestamp();
    publisher.publish_model(
        &ModelMessage {
            schema_version: crate::publish::messages::SCHEMA_VERSION,
            event: "loaded".into(),
            model_version: model.meta.model_version.clone(),
            checkpoint: o.checkpoint.display().to_string(),
            created_at: model.meta.created_at.clone(),
            git_revision: model.meta.git_revision.clone(),
            training_steps: model.meta.training.steps,
            eval: model.meta.eval.clone(),
            at: rfc3339(now),
        },
        Duration::from_secs(10),
    )?;
    tracing::info!(
        model_version = %model.meta.model_version,
        brokers = %o.kafka.brokers,
        source = %source.describe(),
        "daemon started"
    );
    let mut inputs = Inputs::new(
        TagVectors::new(o.model_dir.clone(), o.device.clone()),
        false,
    );
    let mut caught_up = false;
    let mut last_poll: Option<Instant> = None;
    let mut broker_warned = false;
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let t0 = Instant::now();
        let mut cycle = CycleReport::default();
        // 1. At most one diff (once caught up, ask the source again every
        // poll interval).
        let poll_due = !caught_up || last_poll.is_none_or(|t| t.elapsed() >= o.poll_interval);
        if poll_due {
            last_poll = Some(Instant::now());
            let fo = FollowOptions {
                until_caught_up: true,
                poll_interval: o.poll_interval,
                max_diffs: Some(1),
                backoff: o.backoff,
                osc: o.osc.clone(),
                stop: stop.clone(),
            };
            let out = follow(&store, source.as_ref(), &fo, &mut |_| {})?;
            cycle.diffs_applied = out.applied;
            cycle.sequence = out.sequence;
            caught_up = out.applied == 0;
        }
        // 2. Dirty tiles (coarse marks expanded into their children first),
        // oldest first, bounded.
        let (work, marks) = tiles_to_embed(&store)?;
        let by_tile: std::collections::HashMap<TileId, DirtyMark> = marks.into_iter().collect();
        let take = work.len().min(o.max_tiles_per_cycle);
        let mut er = EmbedReport::default();
        for chunk in work[..take].chunks(o.embed_batch.max(1)) {
            let seen: Vec<(TileId, DirtyMark)> = chunk
                .iter()
                .filter_map(|t| by_tile.get(t).map(|m| (*t, *m)))
                .collect();
            embed_tiles(&store, &model, &mut inputs, chunk, &seen, &mut er)?;
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
        inputs.clear();
        cycle.tiles_embedded = er.embedded;
        cycle.tiles_removed = er.removed;
        cycle.dirty_left = work.len() - er.tiles.min(work.len());
        // 3. Publish.
        let wait = if cycle.diffs_applied > 0 || er.tiles > 0 {
            Duration::from_millis(500)
        } else {
            Duration::from_millis(100)
        };
        let dr = publisher.drain(&store, o.max_outbox_per_drain, wait)?;
        cycle.published = dr.delivered;
        cycle.publish_failed = dr.failed;
        if er.drifted > 0 {
            cycle.drift_mean = Some(er.drift_sum / er.drifted as f64);
            cycle.drift_max = er.drift_max;
        }
        cycle.seconds = t0.elapsed().as_secs_f64();
        let busy = cycle.diffs_applied > 0 || er.tiles > 0 || dr.sent > 0 || dr.delivered > 0;
        if busy {
            cycle.outbox = store.outbox_len()?;
            cycle.sequence = store.replication_state()?.0;
            tracing::info!(
                sequence = ?cycle.sequence,
                diffs = cycle.diffs_applied,
                embedded = cycle.tiles_embedded,
                removed = cycle.tiles_removed,
                dirty_left = cycle.dirty_left,
                published = cycle.published,
                outbox = cycle.outbox,
                drift_mean = ?cycle.drift_mean,
                drift_max = ?cycle.drift_max,
                seconds = cycle.seconds,
                "cycle"
            );
            if o.json {
                println!("{}", serde_json::to_string(&cycle)?);
            }
        }
        if !publisher.stats.broker_reachable && publisher.in_flight() > 0 {
            if !broker_warned {
                tracing::warn!(
                    brokers = %o.kafka.brokers,
                    outbox = store.outbox_len()?,
                    "broker unreachable: the outbox holds the updates until it returns"
                );
                broker_warned = true;
            }
        } else if broker_warned && publisher.stats.broker_reachable {
            tracing::info!("broker reachable again; draining the outbox");
            broker_warned = false;
        }
        let nothing_left = cycle.dirty_left == 0
            && er.tiles == 0
            && dr.sent == 0
            && publisher.in_flight() == 0
            && store.outbox_is_empty()?;
        if caught_up && nothing_left && o.until_caught_up {
            tracing::info!("caught up: nothing left to apply, embed or publish");
            break;
        }
        if !busy {
            // Waiting for the source or the broker: do not spin.
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let deadline = Instant::now() + o.shutdown_flush;
    while publisher.in_flight() > 0 && Instant::now() < deadline {
        publisher.drain(&store, 0, Duration::from_millis(200))?;
    }
    tracing::info!(
        delivered = publisher.stats.delivered,
        failed = publisher.stats.failed,
        outbox = store.outbox_len()?,
        sequence = ?store.replication_state()?.0,
        "daemon stopped"
    );
    Ok(())
}
