//! One error type for the crate, so that callers (the daemon) can tell bad
//! input (a coordinate off the globe, a graph whose edges point past its nodes,
//! a checkpoint that does not match the model) from a failure inside candle.

use std::path::PathBuf;

/// Everything that can go wrong in `osmvec-model`.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A candle tensor operation failed (shape mismatch, device error, ...).
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),

    /// A coordinate that is not on the globe.
    #[error("invalid coordinate (lat {lat}, lon {lon}): {reason}")]
    Coordinate {
        lat: f64,
        lon: f64,
        reason: &'static str,
    },

    /// A tile graph that does not fit the model (feature width, edge indices,
    /// relations the model has no weights for).
    #[error("invalid graph: {0}")]
    Graph(String),

    /// A configuration that cannot be built (zero widths, ...).
    #[error("invalid model configuration: {0}")]
    Config(String),

    /// Inputs whose lengths or shapes disagree.
    #[error("invalid input: {0}")]
    Input(String),

    /// A batch in which nothing can be computed (e.g. every graph is empty).
    #[error("empty batch: {0}")]
    EmptyBatch(&'static str),

    /// A checkpoint that cannot be read, written or does not match the model.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
}

/// `Result` with [`ModelError`].
pub type Result<T> = std::result::Result<T, ModelError>;
