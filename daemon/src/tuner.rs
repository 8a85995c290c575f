//! The daemon's background fine-tuning: when to start a run, the run on a
//! thread of its own (niced, so on CPU it yields to applying and embedding),
//! and the checkpoint it leaves behind.
//!
//! A promoted candidate is saved over the serving checkpoint directory with
//! `Model::save`'s protocol (new weight file, then `checkpoint.json` renamed
//! into place): a crash at any point leaves either the old or the new
//! version, complete. A rejected one is saved under
//! `CHECKPOINT/rejected/VERSION-UNIXTIME/` with its scores. The daemon loop
//! only swaps the in-memory model when the thread reports back.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError, channel};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::Result;
use osmvec_graphstore::Store;
use osmvec_graphstore::tiles::TileId;
use osmvec_model::Device;

use crate::observe::drift::{ModelDrift, compare_versions, probe_grid};
use osmvec_pipeline::checkpoint::Model;
use osmvec_pipeline::eval::location_rows;
use osmvec_pipeline::finetune::{FinetuneConfig, FinetuneReport, finetune};
use osmvec_pipeline::inputs::Inputs;
use osmvec_pipeline::tags::TagVectors;

/// What a finished run sends back.
pub enum TunerEvent {
    Promoted {
        model: Box<Model>,
        report: FinetuneReport,
        drift: Option<ModelDrift>,
    },
    Rejected {
        report: FinetuneReport,
        saved_in: PathBuf,
    },
    Failed(String),
}

/// Most recently re-embedded tiles remembered for the next run.
const RECENT_CAP: usize = 100_000;

pub struct Tuner {
    cfg: FinetuneConfig,
    checkpoint: PathBuf,
    model_dir: PathBuf,
    device: Device,
    running: Option<(JoinHandle<()>, Receiver<TunerEvent>)>,
    stop: Arc<AtomicBool>,
    last_run: Instant,
    tiles_since: u64,
    recent: HashSet<TileId>,
    runs: u64,
}

impl Tuner {
    pub fn new(
        cfg: FinetuneConfig,
        checkpoint: PathBuf,
        model_dir: PathBuf,
        device: Device,
    ) -> Tuner {
        Tuner {
            cfg,
            checkpoint,
            model_dir,
            device,
            running: None,
            stop: Arc::new(AtomicBool::new(false)),
            last_run: Instant::now(),
            tiles_since: 0,
            recent: HashSet::new(),
            runs: 0,
        }
    }

    /// Tiles the daemon just re-embedded.
    pub fn observe(&mut self, tiles: impl IntoIterator<Item = TileId>) {
        for t in tiles {
            self.tiles_since += 1;
            if self.recent.len() < RECENT_CAP {
                self.recent.insert(t);
            }
        }
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Whether a run is due (schedule, tile count, or `requested`).
    pub fn due(&self, requested: bool) -> bool {
        !self.is_running()
            && (requested
                || (self.cfg.every_seconds > 0.0
                    && self.last_run.elapsed().as_secs_f64() >= self.cfg.every_seconds)
                || (self.cfg.every_tiles > 0 && self.tiles_since >= self.cfg.every_tiles))
    }

    /// Starts a run against `current` on its own thread.
    pub fn start(&mut self, store: Arc<Store>, current: Arc<Model>) -> Result<()> {
        let (tx, rx) = channel();
        let recent: Vec<TileId> = self.recent.drain().collect();
        self.tiles_since = 0;
        self.runs += 1;
        let seed = current.meta.config.seed ^ (self.runs << 32) ^ current.meta.training.steps;
        let (cfg, checkpoint, model_dir, device, stop) = (
            self.cfg.clone(),
            self.checkpoint.clone(),
            self.model_dir.clone(),
            self.device.clone(),
            self.stop.clone(),
        );
        tracing::info!(
            from = %current.meta.model_version,
            recent = recent.len(),
            steps = cfg.steps,
            "fine-tuning started"
        );
        let handle = std::thread::Builder::new()
            .name("osmvec-finetune".into())
            .spawn(move || {
                // Lower this thread's priority: on CPU it competes with the
                // loop for cores, and the loop's work is the fresh one.
                // SAFETY: setpriority on the calling thread (tid 0 = self).
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, 0, 10);
                }
                let event = match run(
                    &store,
                    &current,
                    &recent,
                    &cfg,
                    &checkpoint,
                    model_dir,
                    &device,
                    seed,
                    stop,
                ) {
                    Ok(e) => e,
                    Err(e) => TunerEvent::Failed(format!("{e:#}")),
                };
                let _ = tx.send(event);
            })?;
        self.running = Some((handle, rx));
        Ok(())
    }

    /// The finished run's event, if one finished.
    pub fn poll(&mut self) -> Option<TunerEvent> {
        let (_, rx) = self.running.as_ref()?;
        let event = match rx.try_recv() {
            Ok(e) => e,
            Err(TryRecvError::Empty) => return None,
            Err(TryRecvError::Disconnected) => {
                TunerEvent::Failed("the fine-tuning thread ended without a result".into())
            }
        };
        if let Some((h, _)) = self.running.take() {
            let _ = h.join();
        }
        self.last_run = Instant::now();
        Some(event)
    }

    /// Stops a run in progress (nothing of it is saved) and waits for it.
    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some((h, _)) = self.running.take() {
            let _ = h.join();
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    store: &Store,
    current: &Model,
    recent: &[TileId],
    cfg: &FinetuneConfig,
    checkpoint: &std::path::Path,
    model_dir: PathBuf,
    device: &Device,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> Result<TunerEvent> {
    let mut inputs = Inputs::new(TagVectors::new(model_dir, device.clone()), true);
    let (mut cand, report) = finetune(store, current, recent, cfg, &mut inputs, seed, stop)?;
    if report.promoted {
        let drift = version_drift(store, current, &cand)?;
        cand.save(checkpoint, None)?;
        Ok(TunerEvent::Promoted {
            model: Box::new(cand),
            report,
            drift,
        })
    } else {
        let dir = checkpoint.join("rejected").join(format!(
            "{}-{}",
            report.candidate_version,
            chrono::Utc::now().timestamp()
        ));
        cand.save(&dir, None)?;
        Ok(TunerEvent::Rejected {
            report,
            saved_in: dir,
        })
    }
}

/// Points per side of the probe grid (64² = 4,096 points).
pub const PROBE_GRID: usize = 64;

/// Location-encoder drift between two models on the probe grid over the
/// stored area (None for an empty store).
pub fn version_drift(store: &Store, old: &Model, new: &Model) -> Result<Option<ModelDrift>> {
    let Some(bbox) = stored_bbox(store)? else {
        return Ok(None);
    };
    let grid = probe_grid(bbox, PROBE_GRID);
    let (a, dim) = location_rows(old, &grid)?;
    let (b, _) = location_rows(new, &grid)?;
    Ok(Some(compare_versions(
        &a,
        &b,
        dim,
        &old.meta.model_version,
        &new.meta.model_version,
    )))
}

/// The bounding box [w, s, e, n] of the fine tiles that hold features.
pub fn stored_bbox(store: &Store) -> Result<Option<[f64; 4]>> {
    let fine = store.tile_config().fine_zoom;
    let mut bb: Option<[f64; 4]> = None;
    for (t, _) in store.tiles()?.into_iter().filter(|(t, _)| t.z == fine) {
        let [w, s, e, n] = t.bounds();
        bb = Some(match bb {
            None => [w, s, e, n],
            Some(b) => [b[0].min(w), b[1].min(s), b[2].max(e), b[3].max(n)],
        });
    }
    Ok(bb)
}
