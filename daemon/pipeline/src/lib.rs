//! The embedding pipeline: store → tile graphs → model inputs → the two
//! encoders → tile embeddings back in the store, plus training,
//! evaluation and fine-tuning of the model on a store, and the tile-job
//! wire format that carries a tile's graph to a worker.
//!
//! This is where graphstore (RocksDB, petgraph) meets the model crate
//! (candle); neither of those knows the other. It knows nothing of Kafka,
//! HTTP or the command line: the `osmvec` binary is the wiring around it.

pub mod baselines;
pub mod checkpoint;
pub mod embed;
pub mod eval;
pub mod finetune;
pub mod graphs;
pub mod inputs;
pub mod jobs;
pub mod split;
pub mod tags;
pub mod train;

/// Parses `cpu` / `cuda` / `cuda:N` into a candle device, with a clear error
/// when CUDA was not compiled in.
pub fn device(spec: &str) -> anyhow::Result<osmvec_model::Device> {
    match spec {
        "cpu" => Ok(osmvec_model::Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--device {s}: expected cuda:N"))?,
                None => 0,
            };
            if !osmvec_model::cuda_compiled() {
                anyhow::bail!(
                    "--device {s}: this osmvec was built without CUDA (cargo build --release --features cuda)"
                );
            }
            Ok(osmvec_model::Device::new_cuda(ordinal)?)
        }
        other => anyhow::bail!("--device {other}: expected cpu, cuda or cuda:N"),
    }
}
