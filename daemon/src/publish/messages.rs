//! The messages osmvec publishes (docs/messages.md has the schema for
//! consumers). JSON with a `schema_version`; keys are plain UTF-8 strings.

use osmvec_graphstore::embeddings::TileEmbedding;
use osmvec_graphstore::outbox::ChangeRecord;
use osmvec_graphstore::tiles::TileId;
use serde::Serialize;

/// Version of every message schema below; bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;

/// Value of a record on the tile-embeddings topic (key: `z/x/y`). A tile
/// without embedding is published as a tombstone (no value).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TileEmbeddingMessage<'a> {
    pub schema_version: u32,
    pub tile: String,
    pub z: u8,
    pub x: u32,
    pub y: u32,
    pub model_version: &'a str,
    /// Replication sequence of the store state the embedding was computed from.
    pub sequence: u64,
    /// When it was computed (RFC 3339, UTC).
    pub computed_at: String,
    pub dim: usize,
    pub vector: &'a [f32],
    /// Cosine distance to the previous embedding of the same model version.
    pub drift: Option<f32>,
}

impl<'a> TileEmbeddingMessage<'a> {
    pub fn new(tile: TileId, e: &'a TileEmbedding) -> Self {
        TileEmbeddingMessage {
            schema_version: SCHEMA_VERSION,
            tile: tile.to_string(),
            z: tile.z,
            x: tile.x,
            y: tile.y,
            model_version: &e.model_version,
            sequence: e.sequence,
            computed_at: rfc3339(e.computed_at),
            dim: e.vector.len(),
            vector: &e.vector,
            drift: e.drift,
        }
    }
}

/// Value of a record on the changes topic (key: `type/id`, e.g. `way/123`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChangeMessage<'a> {
    pub schema_version: u32,
    #[serde(flatten)]
    pub record: &'a ChangeRecord,
    /// The replication timestamp as RFC 3339, when known.
    pub timestamp_rfc3339: Option<String>,
}

impl<'a> ChangeMessage<'a> {
    pub fn new(record: &'a ChangeRecord) -> Self {
        ChangeMessage {
            schema_version: SCHEMA_VERSION,
            record,
            timestamp_rfc3339: record.timestamp.map(rfc3339),
        }
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.record.osm_type, self.record.id)
    }
}

/// Value of a record on the models topic (key: the model version).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelMessage {
    pub schema_version: u32,
    /// `loaded` (a process started serving it) or `promoted`.
    pub event: String,
    pub model_version: String,
    pub checkpoint: String,
    pub created_at: String,
    pub git_revision: String,
    pub training_steps: u64,
    pub eval: Option<serde_json::Value>,
    pub at: String,
}

pub fn rfc3339(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_message_shape() {
        let e = TileEmbedding {
            model_version: "1.0".into(),
            sequence: 42,
            computed_at: 0,
            vector: vec![0.6, 0.8],
            drift: Some(0.5),
        };
        let t = TileId { z: 15, x: 3, y: 4 };
        let v: serde_json::Value = serde_json::to_value(TileEmbeddingMessage::new(t, &e)).unwrap();
        assert_eq!(v["schema_version"], 1);
        assert_eq!(v["tile"], "15/3/4");
        assert_eq!(v["model_version"], "1.0");
        assert_eq!(v["sequence"], 42);
        assert_eq!(v["computed_at"], "1970-01-01T00:00:00Z");
        assert_eq!(v["dim"], 2);
        assert_eq!(v["drift"], 0.5);
    }
}
