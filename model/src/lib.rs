//! The learning side of osmvec (candle encoders, contrastive training,
//! checkpoints, evaluation).
//!
//! Not implemented yet: this crate is the home of the tag encoder, the
//! heterogeneous graph encoder and the spherical-harmonics location encoder
//! described in docs/ARCHITECTURE.md (issue "Model: tile graphs and the
//! OSMGraphCLIP encoders"). It deliberately has no code and no dependencies
//! until then, so that nothing here pretends to work.
