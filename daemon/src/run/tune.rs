//! The tune stage: a fine-tuning run started when due (schedule, tile
//! count, or `POST /v1/finetune`) on the tuner's thread, and a finished
//! run's result taken: promoted, rejected by the gate, or failed.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Result;
use osmvec_graphstore::Store;
use osmvec_pipeline::checkpoint::Model;
use osmvec_pipeline::embed::EmbedReport;
use osmvec_pipeline::finetune::FinetuneReport;

use super::RunOptions;
use super::publish::Publish;
use super::served::{record_model_drift, served};
use crate::observe::api::Shared;
use crate::tuner::{Tuner, TunerEvent};

pub(super) struct Tune {
    tuner: Tuner,
    checkpoint: PathBuf,
}

impl Tune {
    pub(super) fn new(o: &RunOptions) -> Tune {
        Tune {
            tuner: Tuner::new(
                o.finetune.clone(),
                o.checkpoint.clone(),
                o.model_dir.clone(),
                o.device.clone(),
            ),
            checkpoint: o.checkpoint.clone(),
        }
    }

    /// The tiles a cycle re-embedded (they count toward `every_tiles` and
    /// are the run's recent tiles).
    pub(super) fn observe(&mut self, er: &EmbedReport) {
        self.tuner
            .observe(er.results.iter().filter(|r| r.1.is_some()).map(|r| r.0));
    }

    /// Takes a finished run's result (a promoted model replaces `model`),
    /// then starts a run when one is due.
    pub(super) fn step(
        &mut self,
        shared: &Shared,
        store: &Arc<Store>,
        model: &mut Arc<Model>,
        publish: &mut Publish,
    ) -> Result<()> {
        if let Some(event) = self.tuner.poll() {
            handle_event(event, shared, model, publish, &self.checkpoint)?;
        }
        if self
            .tuner
            .due(shared.finetune_requested.swap(false, Ordering::Relaxed))
        {
            self.tuner.start(store.clone(), model.clone())?;
        }
        Ok(())
    }

    pub(super) fn is_running(&self) -> bool {
        self.tuner.is_running()
    }

    pub(super) fn shutdown(&mut self) {
        self.tuner.shutdown();
    }
}

/// Metrics and the log line of a finished fine-tuning run; on promotion the
/// new model replaces `model` (and the shared one), is announced on the
/// models topic and recorded in the store. Returns whether it was promoted.
fn handle_event(
    event: TunerEvent,
    shared: &Shared,
    model: &mut Arc<Model>,
    publish: &mut Publish,
    checkpoint: &std::path::Path,
) -> Result<bool> {
    let m = &shared.metrics;
    let scores = |r: &FinetuneReport| {
        for (which, s) in [("current", r.current), ("candidate", r.candidate)] {
            m.finetune_eval_score
                .with_label_values(&[which, "retrieval_top10"])
                .set(s.retrieval_top10);
            m.finetune_eval_score
                .with_label_values(&[which, "probe_macro_f1"])
                .set(s.probe_macro_f1.unwrap_or(f64::NAN));
        }
        m.finetune_duration_seconds.set(r.seconds);
    };
    match event {
        TunerEvent::Promoted {
            model: new,
            report,
            drift,
        } => {
            m.finetune_runs_total.with_label_values(&["promoted"]).inc();
            scores(&report);
            let old_version = model.meta.model_version.clone();
            let new: Arc<Model> = Arc::from(new);
            *model = new.clone();
            *shared.model.write().unwrap_or_else(|e| e.into_inner()) = new.clone();
            let _ = m.model_info.remove_label_values(&[&old_version]);
            m.model_info
                .with_label_values(&[&new.meta.model_version])
                .set(1);
            tracing::info!(
                from = %old_version,
                to = %new.meta.model_version,
                current = ?report.current,
                candidate = ?report.candidate,
                seconds = report.seconds,
                "fine-tuned model promoted"
            );
            if let Some(d) = drift {
                record_model_drift(shared, d);
            }
            publish.announce(&new, "promoted", checkpoint)?;
            shared
                .store
                .set_served_model(&serde_json::to_vec(&served(&new, checkpoint))?)?;
            *shared
                .last_finetune
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(report);
            Ok(true)
        }
        TunerEvent::Rejected { report, saved_in } => {
            m.finetune_runs_total.with_label_values(&["rejected"]).inc();
            scores(&report);
            tracing::warn!(
                candidate = %report.candidate_version,
                current = ?report.current,
                scores = ?report.candidate,
                tolerance = report.tolerance,
                saved_in = %saved_in.display(),
                "fine-tuned candidate rejected by the gate; the current version keeps serving"
            );
            *shared
                .last_finetune
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(report);
            Ok(false)
        }
        TunerEvent::Failed(e) => {
            m.finetune_runs_total.with_label_values(&["failed"]).inc();
            tracing::error!(error = %e, "fine-tuning failed; the current version keeps serving");
            Ok(false)
        }
    }
}
