//! What the daemon shows of itself: Prometheus metrics, drift at tile and
//! model-version level, and the HTTP API with the drift page; `worker` is
//! what an `osmvec worker` shows of itself.

pub mod api;
pub mod drift;
pub mod metrics;
pub mod worker;
