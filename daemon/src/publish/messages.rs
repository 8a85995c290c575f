//! The messages osmvec publishes (docs/messages.md has the schema for
//! consumers). JSON with a `schema_version` by default, or CBOR (RFC 8949)
//! with the same fields and the vector as one byte string of little-endian
//! f32 — a third of the JSON size, decodable in any language without a schema
//! compiler. Keys are plain UTF-8 strings.

use osmvec_graphstore::embeddings::TileEmbedding;
use osmvec_graphstore::outbox::ChangeRecord;
use osmvec_graphstore::tiles::TileId;
use serde::{Deserialize, Serialize, Serializer};

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

/// How message values are encoded; every record carries a `content-type`
/// header (`application/json` or `application/cbor`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Json,
    Cbor,
}

impl Encoding {
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Json => "application/json",
            Encoding::Cbor => "application/cbor",
        }
    }

    /// Encodes any message; for tile embeddings use [`Encoding::encode_tile`]
    /// (packed vector in CBOR).
    pub fn encode<T: Serialize>(self, value: &T) -> Result<Vec<u8>, EncodeError> {
        match self {
            Encoding::Json => serde_json::to_vec(value).map_err(|e| EncodeError(e.to_string())),
            Encoding::Cbor => {
                let mut out = Vec::new();
                ciborium::into_writer(value, &mut out).map_err(|e| EncodeError(e.to_string()))?;
                Ok(out)
            }
        }
    }

    pub fn encode_tile(self, m: &TileEmbeddingMessage<'_>) -> Result<Vec<u8>, EncodeError> {
        match self {
            Encoding::Json => self.encode(m),
            Encoding::Cbor => self.encode(&PackedTile {
                m,
                vector: F32Le(m.vector),
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot encode a message: {0}")]
pub struct EncodeError(String);

/// The CBOR form of a tile message: the same fields, but `vector` is a byte
/// string of `dim` little-endian f32.
struct PackedTile<'a, 'b> {
    m: &'b TileEmbeddingMessage<'a>,
    vector: F32Le<'a>,
}

impl Serialize for PackedTile<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let m = self.m;
        let mut map = s.serialize_map(Some(11))?;
        map.serialize_entry("schema_version", &m.schema_version)?;
        map.serialize_entry("tile", &m.tile)?;
        map.serialize_entry("z", &m.z)?;
        map.serialize_entry("x", &m.x)?;
        map.serialize_entry("y", &m.y)?;
        map.serialize_entry("model_version", &m.model_version)?;
        map.serialize_entry("sequence", &m.sequence)?;
        map.serialize_entry("computed_at", &m.computed_at)?;
        map.serialize_entry("dim", &m.dim)?;
        map.serialize_entry("vector", &self.vector)?;
        map.serialize_entry("drift", &m.drift)?;
        map.end()
    }
}

struct F32Le<'a>(&'a [f32]);

impl Serialize for F32Le<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = self.0.iter().flat_map(|x| x.to_le_bytes()).collect();
        s.serialize_bytes(&bytes)
    }
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

    #[test]
    fn cbor_tile_message_has_the_same_fields_and_a_packed_vector() {
        let e = TileEmbedding {
            model_version: "1.0".into(),
            sequence: 42,
            computed_at: 0,
            vector: vec![0.6, -0.8, 1e-7],
            drift: None,
        };
        let t = TileId { z: 15, x: 3, y: 4 };
        let m = TileEmbeddingMessage::new(t, &e);
        let bytes = Encoding::Cbor.encode_tile(&m).unwrap();
        let v: ciborium::Value = ciborium::from_reader(bytes.as_slice()).unwrap();
        let map = v.as_map().unwrap();
        let get = |k: &str| {
            map.iter()
                .find(|(key, _)| key.as_text() == Some(k))
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("no field {k}"))
        };
        assert_eq!(get("tile").as_text(), Some("15/3/4"));
        assert_eq!(get("sequence").as_integer(), Some(42.into()));
        assert!(get("drift").is_null());
        let packed = get("vector").into_bytes().unwrap();
        let back: Vec<f32> = packed
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(back, e.vector);
        // Every JSON field is there, the vector is a third of JSON's size.
        let json = Encoding::Json.encode_tile(&m).unwrap();
        let jv: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(jv.as_object().unwrap().len(), map.len());
    }
}
