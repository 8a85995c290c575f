//! Which model this daemon serves, as recorded in the store: at start a
//! different model than last time is compared with the old one on the
//! probe grid (version drift), and every promotion is recorded.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use osmvec_model::Device;
use osmvec_pipeline::checkpoint::Model;
use serde::Serialize;

use crate::observe::api::Shared;
use crate::observe::drift::ModelDrift;
use crate::tuner::version_drift;

/// The model the daemon served last time, as recorded in the store.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub(super) struct ServedModel {
    model_version: String,
    created_at: String,
    checkpoint: PathBuf,
}

/// When this start serves a different model than the last one (another
/// version, or the same version number retrained) and the old checkpoint
/// still loads, compares their location encoders on the probe grid over
/// the stored area: metrics, `/v1/drift` and a log line.
pub(super) fn compare_with_served_model(
    shared: &Shared,
    checkpoint: &Path,
    device: &Device,
) -> Result<()> {
    let model = shared
        .model
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let current = served(&model, checkpoint);
    let previous: Option<ServedModel> = shared
        .store
        .served_model()?
        .and_then(|b| serde_json::from_slice(&b).ok());
    // Another model: another version, or the same version retrained (a
    // checkpoint merely moved or copied is the same model).
    let same_model = |p: &ServedModel| {
        p.model_version == current.model_version && p.created_at == current.created_at
    };
    if let Some(prev) = previous.filter(|p| !same_model(p)) {
        match Model::load(&prev.checkpoint, device) {
            Ok(old) if old.meta.created_at == prev.created_at => {
                let t0 = Instant::now();
                if let Some(d) = version_drift(&shared.store, &old, &model)? {
                    tracing::info!(
                        seconds = t0.elapsed().as_secs_f64(),
                        "model drift against the previously served checkpoint"
                    );
                    record_model_drift(shared, d);
                }
            }
            _ => tracing::info!(
                previous = %prev.checkpoint.display(),
                "the previously served checkpoint is gone or changed: no version drift to compute"
            ),
        }
    }
    shared
        .store
        .set_served_model(&serde_json::to_vec(&current)?)?;
    Ok(())
}

/// Version-level drift into metrics, `/v1/drift` and the log.
pub(super) fn record_model_drift(shared: &Shared, d: ModelDrift) {
    let m = &shared.metrics;
    m.model_drift_mean_cosine_distance
        .set(d.mean_cosine_distance);
    m.model_drift_mean_embedding_distance
        .set(d.mean_embedding_distance);
    m.model_drift_mmd2.set(d.mmd2);
    tracing::info!(
        from = %d.from,
        to = %d.to,
        points = d.points,
        mean_cosine_distance = d.mean_cosine_distance,
        mean_embedding_distance = d.mean_embedding_distance,
        mmd2 = d.mmd2,
        "model drift on the probe grid"
    );
    *shared.model_drift.lock().unwrap_or_else(|e| e.into_inner()) = Some(d);
}

/// The serving model's identity, as recorded in the store.
pub(super) fn served(model: &Model, checkpoint: &Path) -> ServedModel {
    ServedModel {
        model_version: model.meta.model_version.clone(),
        created_at: model.meta.created_at.clone(),
        checkpoint: std::fs::canonicalize(checkpoint).unwrap_or_else(|_| checkpoint.into()),
    }
}
