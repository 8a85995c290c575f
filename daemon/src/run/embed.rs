//! The embed and sweep stages: the cycle's dirty tiles (or, in ingest mode,
//! jobs for the workers), then what the cycle's budget leaves for the
//! re-embed sweep of a new major version.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Result;
use osmvec_graphstore::Store;
use osmvec_graphstore::embeddings::DirtyMark;
use osmvec_graphstore::tiles::TileId;
use osmvec_pipeline::checkpoint::Model;
use osmvec_pipeline::embed::{
    EmbedReport, embed_pipelined, embed_tiles, same_space, tiles_to_embed,
};
use osmvec_pipeline::inputs::Inputs;
use osmvec_pipeline::tags::TagVectors;

use super::replicate::Replicate;
use super::{CycleReport, RunOptions};
use crate::config::Mode;
use crate::observe::api::{Shared, TileState, now_unix};
use crate::observe::metrics::Metrics;

pub(super) struct Embed {
    inputs: Inputs,
    mode: Mode,
    context_pruning: bool,
    max_tiles_per_cycle: usize,
    batch: usize,
    debounce: Duration,
}

/// What the embed stage did in a cycle.
pub(super) struct Embedded {
    pub(super) report: EmbedReport,
    /// Dirty tiles taken (embedded or queued as jobs).
    pub(super) taken: usize,
    /// Ingest mode: jobs queued for workers instead of embeddings.
    pub(super) jobs_queued: usize,
}

impl Embed {
    pub(super) fn new(o: &RunOptions) -> Embed {
        Embed {
            inputs: Inputs::new(
                TagVectors::new(o.model_dir.clone(), o.device.clone()),
                false,
            ),
            mode: o.mode,
            context_pruning: o.context_pruning,
            max_tiles_per_cycle: o.max_tiles_per_cycle,
            batch: o.embed_batch,
            debounce: o.debounce,
        }
    }

    /// Dirty tiles (coarse marks expanded into their children first),
    /// oldest first, bounded. Reads only the marks the cycle can take; in
    /// embed mode a dirty coarse tile marks only the children whose
    /// context really changed. Debounce: while the source has more diffs
    /// queued, the cycle waits until `debounce` has passed since the first
    /// unembedded diff (or the dirty tiles fill a cycle).
    pub(super) fn step(
        &mut self,
        store: &Store,
        model: &Model,
        m: &Metrics,
        replicate: &Replicate,
        paused: bool,
        stop: &AtomicBool,
    ) -> Result<Embedded> {
        let (work, marks, _contexts) = tiles_to_embed(
            store,
            model,
            &mut self.inputs,
            self.max_tiles_per_cycle.max(1),
            self.mode == Mode::Embed && self.context_pruning,
        )?;
        let by_tile: HashMap<TileId, DirtyMark> = marks.into_iter().collect();
        let wait_for_more = !replicate.caught_up
            && work.len() < self.max_tiles_per_cycle
            && replicate
                .pending_since
                .is_some_and(|t| t.elapsed() < self.debounce);
        let taken = if wait_for_more || paused {
            0
        } else {
            work.len().min(self.max_tiles_per_cycle)
        };
        let mut er = EmbedReport::default();
        let mut jobs_queued = 0;
        if self.mode == Mode::Ingest {
            for chunk in work[..taken].chunks(self.batch.max(1)) {
                let seen: Vec<(TileId, DirtyMark)> = chunk
                    .iter()
                    .filter_map(|t| by_tile.get(t).map(|m| (*t, *m)))
                    .collect();
                // Jobs for the workers, built from the store when sent.
                store.queue_jobs(chunk, &seen)?;
                er.tiles += chunk.len();
                jobs_queued += chunk.len();
            }
        } else if taken > 0 {
            // The next batch's inputs are built while the encoder runs.
            embed_pipelined(
                store,
                model,
                &mut self.inputs,
                &work[..taken],
                self.batch,
                &by_tile,
                Some(stop),
                &mut er,
            )?;
            for s in std::mem::take(&mut er.batch_seconds) {
                m.embed_batch_duration_seconds.observe(s);
            }
        }
        Ok(Embedded {
            report: er,
            taken,
            jobs_queued,
        })
    }

    /// The inputs' caches, shared with the sweep.
    pub(super) fn inputs(&mut self) -> &mut Inputs {
        &mut self.inputs
    }

    /// Ends the cycle: graphs and contexts cached for it are dropped.
    pub(super) fn end_cycle(&mut self) {
        self.inputs.clear();
    }
}

/// The re-embed sweep after a major version change: every tile embedded
/// by another major version, a bounded number per cycle.
pub(super) struct Sweep {
    /// Popped from the end: key order reversed.
    tiles: Vec<TileId>,
    per_cycle: usize,
    max_tiles_per_cycle: usize,
    batch: usize,
}

impl Sweep {
    /// Known before the first scrape: what a new major version must redo
    /// (nothing in ingest mode, which stores no embeddings).
    pub(super) fn new(o: &RunOptions, store: &Store, model: &Model, m: &Metrics) -> Result<Sweep> {
        let tiles = if o.mode == Mode::Embed {
            tiles_to_sweep(store, &model.meta.model_version)?
        } else {
            Vec::new()
        };
        m.sweep_tiles_remaining.set(tiles.len() as i64);
        Ok(Sweep {
            tiles,
            per_cycle: o.sweep_tiles_per_cycle,
            max_tiles_per_cycle: o.max_tiles_per_cycle,
            batch: o.embed_batch,
        })
    }

    pub(super) fn log_start(&self, model: &Model) {
        if !self.tiles.is_empty() {
            tracing::info!(
                tiles = self.tiles.len(),
                model_version = %model.meta.model_version,
                per_cycle = self.per_cycle,
                "new major version: re-embedding every tile (the old embeddings stay published until replaced)"
            );
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.tiles.is_empty()
    }

    /// Re-embeds in what the cycle's budget leaves after `er`'s dirty
    /// tiles (tiles a diff re-embedded meanwhile, or that lost their
    /// features, are skipped). True when this step finished the sweep.
    pub(super) fn step(
        &mut self,
        store: &Store,
        model: &Model,
        inputs: &mut Inputs,
        m: &Metrics,
        er: &mut EmbedReport,
    ) -> Result<bool> {
        let budget = self
            .per_cycle
            .min(self.max_tiles_per_cycle.saturating_sub(er.tiles));
        if budget == 0 || self.tiles.is_empty() {
            return Ok(false);
        }
        let mut batch = Vec::with_capacity(budget);
        while batch.len() < budget {
            let Some(t) = self.tiles.pop() else { break };
            if store
                .tile_embedding(t)?
                .is_some_and(|e| !same_space(&e.model_version, &model.meta.model_version))
            {
                batch.push(t);
            }
        }
        for chunk in batch.chunks(self.batch.max(1)) {
            let tb = Instant::now();
            embed_tiles(store, model, inputs, chunk, &[], er)?;
            m.embed_batch_duration_seconds
                .observe(tb.elapsed().as_secs_f64());
        }
        m.sweep_tiles_remaining.set(self.tiles.len() as i64);
        if self.tiles.is_empty() {
            tracing::info!(
                model_version = %model.meta.model_version,
                "sweep complete: every tile is embedded by the new major version"
            );
        }
        Ok(self.tiles.is_empty())
    }
}

/// Tiles whose stored embedding comes from another major version than
/// `version` (a new full training run): the sweep re-embeds them, in key
/// order (popped from the end, so reversed here).
fn tiles_to_sweep(store: &Store, version: &str) -> Result<Vec<TileId>> {
    let mut tiles: Vec<TileId> = store
        .tile_embeddings()?
        .into_iter()
        .filter(|(_, e)| !same_space(&e.model_version, version))
        .map(|(t, _)| t)
        .collect();
    tiles.reverse();
    Ok(tiles)
}

/// Metrics, the tile layer and the drift window after a cycle's embeddings.
pub(super) fn record_embeddings(
    shared: &Shared,
    er: &EmbedReport,
    cycle: &CycleReport,
) -> Result<()> {
    let m = &shared.metrics;
    m.tiles_embedded_total.inc_by(er.embedded as u64);
    m.tiles_removed_total.inc_by(er.removed as u64);
    let mut drifts = Vec::new();
    {
        let mut tiles = shared.tiles.write().unwrap_or_else(|e| e.into_inner());
        for (t, r) in &er.results {
            match r {
                Some((sequence, drift)) => {
                    if let Some(d) = drift {
                        m.tile_drift_cosine_distance.observe(f64::from(*d));
                        drifts.push(*d);
                    }
                    tiles.insert(
                        *t,
                        TileState {
                            drift: *drift,
                            sequence: *sequence,
                        },
                    );
                }
                None => {
                    tiles.remove(t);
                }
            }
        }
    }
    let now = now_unix();
    let ts = m.replication_timestamp_seconds.get();
    let lag = (ts > 0.0).then(|| (now - ts).max(0.0));
    let mut w = shared.drift.lock().unwrap_or_else(|e| e.into_inner());
    w.record_cycle(now, &drifts, er.tiles, cycle.sequence, lag);
    m.drifted_tiles_ratio
        .set(w.summary(now).drifted_share.unwrap_or(0.0));
    Ok(())
}
