//! The graph store of osmvec: OSM elements, their readers, the RocksDB schema
//! that holds them, diff application, derived features and tiles.
//!
//! This crate knows nothing of candle or Kafka: it turns OSM files into a
//! consistent, crash-safe store and tells its callers which tiles changed.

pub mod apply;
mod codec;
mod derive;
pub mod element;
pub mod embeddings;
pub mod error;
pub mod event;
pub mod feature;
pub mod graph;
mod idhash;
pub mod import;
pub mod landuse;
mod opl;
pub mod outbox;
pub mod read;
pub mod store;
pub mod tiles;

pub use error::{Result, StoreError};
pub use feature::TileConfig;
pub use store::Store;
