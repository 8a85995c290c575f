//! The messages osmvec publishes (docs/messages.md has the schema for
//! consumers). JSON with a `schema_version` by default, or CBOR (RFC 8949)
//! with the same fields and the vector as one byte string of little-endian
//! f32 — a third of the JSON size, decodable in any language without a schema
//! compiler. Keys are plain UTF-8 strings.

use osmvec_graphstore::embeddings::TileEmbedding;
use osmvec_graphstore::event::ChangeRecord;
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
    pub record: std::borrow::Cow<'a, ChangeRecord>,
    /// The replication timestamp as RFC 3339, when known.
    pub timestamp_rfc3339: Option<String>,
    /// Present (true) only when the record was cut to fit the broker's
    /// record size: long tag values end in `…`, or the tags (then the tile
    /// list) were left out. The object itself is in the store and on OSM.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// Tag values longer than this are cut when a change record must shrink.
pub const CUT_TAG_VALUE_BYTES: usize = 256;

impl<'a> ChangeMessage<'a> {
    pub fn new(record: &'a ChangeRecord) -> Self {
        ChangeMessage {
            schema_version: SCHEMA_VERSION,
            record: std::borrow::Cow::Borrowed(record),
            timestamp_rfc3339: record.timestamp.map(rfc3339),
            truncated: false,
        }
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.record.osm_type, self.record.id)
    }

    /// The encoded value, at most `max` bytes: as is when it fits, else cut
    /// in steps — tag values to [`CUT_TAG_VALUE_BYTES`], then no tags, then
    /// fewer tiles — with `truncated: true`. (A record of a feature with a
    /// 2 MB tag value would otherwise be refused by the broker for good.)
    pub fn encode_within(&self, enc: Encoding, max: usize) -> Result<(Vec<u8>, bool), EncodeError> {
        let whole = enc.encode(self)?;
        if whole.len() <= max {
            return Ok((whole, false));
        }
        let mut r: ChangeRecord = self.record.as_ref().clone();
        let cut = |tags: &mut Option<std::collections::BTreeMap<String, String>>| {
            for v in tags.iter_mut().flat_map(|t| t.values_mut()) {
                if v.len() > CUT_TAG_VALUE_BYTES {
                    let mut end = CUT_TAG_VALUE_BYTES;
                    while !v.is_char_boundary(end) {
                        end -= 1;
                    }
                    v.truncate(end);
                    v.push('…');
                }
            }
        };
        cut(&mut r.tags_before);
        cut(&mut r.tags_after);
        let attempt = |r: &ChangeRecord| {
            enc.encode(&ChangeMessage {
                schema_version: self.schema_version,
                record: std::borrow::Cow::Borrowed(r),
                timestamp_rfc3339: self.timestamp_rfc3339.clone(),
                truncated: true,
            })
        };
        let bytes = attempt(&r)?;
        if bytes.len() <= max {
            return Ok((bytes, true));
        }
        r.tags_before = None;
        r.tags_after = None;
        let mut bytes = attempt(&r)?;
        while bytes.len() > max && !r.tiles.is_empty() {
            let keep = r.tiles.len() * max / bytes.len();
            r.tiles.truncate(keep.min(r.tiles.len() - 1));
            bytes = attempt(&r)?;
        }
        if bytes.len() > max {
            return Err(EncodeError(format!(
                "change record of {} {} does not fit {max} bytes even without tags and tiles",
                r.osm_type, r.id
            )));
        }
        Ok((bytes, true))
    }
}

/// The longest a tile-embedding record can be for vectors of `dim` floats:
/// every field at its longest (z 30, x and y at 2^30, the largest sequence
/// and time, a drift), and in JSON each float at the longest text an f32
/// takes (15 characters, `-1.23456789e-38`; CBOR packs 4 bytes each).
/// Embedding records have a fixed shape — the vector's length is the model's
/// output width — so this bound holds for every record the daemon or a
/// worker sends; the daemon checks at start that it fits the broker's
/// record size, so an embedding record is never refused for its size.
pub fn longest_tile_record(
    enc: Encoding,
    dim: usize,
    model_version: &str,
) -> Result<usize, EncodeError> {
    let e = TileEmbedding {
        model_version: model_version.to_string(),
        sequence: u64::MAX,
        computed_at: 253_402_300_799, // 9999-12-31T23:59:59Z
        vector: vec![0.0; dim],
        drift: Some(0.0),
    };
    let t = TileId {
        z: 30,
        x: (1 << 30) - 1,
        y: (1 << 30) - 1,
    };
    let base = enc.encode_tile(&TileEmbeddingMessage::new(t, &e))?.len();
    Ok(match enc {
        // "0.0" → at most 15 characters, for the vector and the drift.
        Encoding::Json => base + (dim + 1) * 12,
        // A float other than 0 may take a wider CBOR float.
        Encoding::Cbor => base + 8,
    })
}

/// Value of a record on the dead-letter topic (key: the refused record's
/// key), always JSON: a record the broker refused for good, or one that
/// could not be built, described so an operator can see what and why.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadLetter {
    pub schema_version: u32,
    /// The topic the record was for.
    pub topic: String,
    pub key: String,
    /// The broker's (or the builder's) error.
    pub error: String,
    /// Size of the refused value (0 when it could not be built).
    pub payload_bytes: usize,
    /// Its first bytes (at most [`DEAD_LETTER_HEAD`]), hex.
    pub payload_head_hex: String,
    /// The outbox entry it came from (hex key, entry id).
    pub outbox_key_hex: String,
    pub outbox_id: u64,
    pub at: String,
}

/// Bytes of a refused value a dead letter carries.
pub const DEAD_LETTER_HEAD: usize = 16 << 10;

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
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

    fn change(value_bytes: usize, tiles: usize) -> ChangeRecord {
        let mut tags = std::collections::BTreeMap::new();
        tags.insert("amenity".to_string(), "cafe".to_string());
        tags.insert("description".to_string(), "é".repeat(value_bytes / 2));
        ChangeRecord {
            sequence: Some(7),
            timestamp: Some(0),
            osm_type: "node".into(),
            id: 9,
            version: 1,
            action: "created".into(),
            tiles: (0..tiles).map(|i| format!("15/{i}/1")).collect(),
            tags_before: None,
            tags_after: Some(tags),
        }
    }

    #[test]
    fn an_oversized_change_record_is_cut_and_flagged() {
        for enc in [Encoding::Json, Encoding::Cbor] {
            // Small: unchanged, no flag.
            let small = change(100, 2);
            let (b, cut) = ChangeMessage::new(&small)
                .encode_within(enc, 10_000)
                .unwrap();
            assert!(!cut);
            assert_eq!(b, enc.encode(&ChangeMessage::new(&small)).unwrap());
            // A 2 MB tag value: cut to fit 1 MB, flagged, the value shortened
            // at a character boundary, the other tags kept.
            let big = change(2 << 20, 2);
            let (b, cut) = ChangeMessage::new(&big)
                .encode_within(enc, 1_000_000)
                .unwrap();
            assert!(cut && b.len() <= 1_000_000);
            let v: serde_json::Value = match enc {
                Encoding::Json => serde_json::from_slice(&b).unwrap(),
                Encoding::Cbor => ciborium::from_reader(b.as_slice()).unwrap(),
            };
            assert_eq!(v["truncated"], true);
            assert_eq!(v["tags_after"]["amenity"], "cafe");
            let d = v["tags_after"]["description"].as_str().unwrap();
            assert!(
                d.ends_with('…') && d.len() <= CUT_TAG_VALUE_BYTES + 3,
                "{}",
                d.len()
            );
            assert_eq!(v["tiles"].as_array().unwrap().len(), 2);
            // Thousands of tiles and a tight limit: tags go, then tiles.
            let wide = change(10, 5000);
            let (b, cut) = ChangeMessage::new(&wide).encode_within(enc, 2000).unwrap();
            assert!(cut && b.len() <= 2000, "{}", b.len());
        }
    }

    #[test]
    fn embedding_records_are_small_by_construction() {
        // 256-d (the default model): far below the 1 MB default record size.
        let json = longest_tile_record(Encoding::Json, 256, "1.0").unwrap();
        let cbor = longest_tile_record(Encoding::Cbor, 256, "1.0").unwrap();
        assert!(json < 8 << 10 && cbor < 2 << 10, "{json} {cbor}");
        // And the bound is a bound: a real record is no longer.
        let e = TileEmbedding {
            model_version: "1.0".into(),
            sequence: 178,
            computed_at: 1_488_354_540,
            vector: (0..256).map(|i| -0.123_456_79 * i as f32).collect(),
            drift: Some(0.012_345_678),
        };
        let t = TileId {
            z: 15,
            x: 23_077,
            y: 15_999,
        };
        let real = Encoding::Json
            .encode_tile(&TileEmbeddingMessage::new(t, &e))
            .unwrap();
        assert!(real.len() <= json, "{} > {json}", real.len());
    }

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
