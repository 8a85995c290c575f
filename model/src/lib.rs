//! The learning side of osmvec: the candle building blocks of the
//! OSMGraphCLIP-style model (docs/ARCHITECTURE.md, "The model").
//!
//! Two encoders meet in one embedding space:
//!
//! * the **graph encoder** ([`GraphEncoder`]) turns a map tile's heterogeneous
//!   feature graph (points, polylines, polygons and their relations) into one
//!   L2-normalised vector: heterogeneous GAT message passing ([`gat`]), per-type
//!   Set2Set pooling, attention across the three node types and fusion with a
//!   coarse-context vector ([`pool`]);
//! * the **location encoder** ([`LocationEncoder`]) maps any (lat, lon) on Earth
//!   to a vector: real spherical harmonics ([`sh`]) feeding a SIREN MLP
//!   ([`siren`]), as in SatCLIP.
//!
//! [`loss::InfoNce`] is the symmetric contrastive objective that aligns them.
//! [`params::Params`] holds the weights: deterministic seeded initialisation and
//! safetensors checkpoints with metadata.
//!
//! [`text::TagEncoder`] is the pretrained all-MiniLM-L6-v2 (candle-transformers'
//! BERT + `tokenizers`) that turns `key=value` tag strings into 384-d vectors.
//!
//! What is deliberately not here: the store, training loops and the CLI. Node feature
//! vectors arrive as plain `f32` rows ([`graph::TileGraph`]); whoever builds tile
//! graphs decides what goes into them (tag-text mean + geometry features).
//!
//! Everything runs on candle's CPU backend by default; the `cuda` feature
//! enables candle's CUDA backend, and every module takes the [`Device`] to use.
//! The model dtype is `f32` ([`MODEL_DTYPE`]); spherical harmonics are computed
//! in `f64` and converted at the end, like SatCLIP's float64 features.

pub mod engine;
pub mod error;
pub mod gat;
pub mod graph;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod params;
pub mod pool;
pub mod segment;
pub mod sh;
pub mod siren;
pub mod stats;
pub mod text;

pub use candle_core::{DType, Device, Tensor};
pub use engine::{Engine, PackedBatch};
pub use error::{ModelError, Result};
pub use gat::{EdgeType, NodeType, Relation};
pub use graph::{
    GraphBatch, GraphEmbeddings, GraphEncoder, GraphEncoderConfig, RegionVectors, TileGraph,
};
pub use loss::InfoNce;
pub use params::Params;
pub use sh::SphericalHarmonics;
pub use siren::{LocationEncoder, LocationEncoderConfig, Siren, SirenConfig};

/// The dtype of every weight and activation of the model.
///
/// `f32` is what candle's CPU and CUDA matmuls are fast at; the spherical
/// harmonics are computed in `f64` first (see [`sh`]) so that high degrees stay
/// accurate, then converted.
pub const MODEL_DTYPE: DType = DType::F32;

/// Row-wise L2 normalisation of a `[n, d]` tensor: `x / max(‖x‖, eps)`.
///
/// The clamp keeps an all-zero row at zero instead of producing NaN (such a row
/// only appears for masked samples, which callers ignore).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12f64, f64::MAX)?;
    Ok(x.broadcast_div(&norm)?)
}

/// Whether this build has candle's CUDA backend (the `cuda` feature).
pub fn cuda_compiled() -> bool {
    cfg!(feature = "cuda")
}

#[cfg(test)]
pub(crate) mod testutil {
    use candle_core::{Device, Shape, Tensor};

    /// A seeded standard-normal `f32` tensor on the CPU (tests must not
    /// depend on candle's unseedable CPU RNG).
    pub fn randn<S: Into<Shape>>(seed: u64, shape: S) -> Tensor {
        let shape = shape.into();
        let mut rng = crate::params::SplitMix64::new(seed);
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| rng.next_normal() as f32)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}
