//! What an applied diff says about the features it changed: the event
//! (built by `apply`) and the change record the outbox keeps of it (read by
//! `outbox` and the publisher). A leaf: it depends on no other module, so
//! `apply` and `outbox` both depend on it and not on each other.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How a feature changed, for subscribers of change events.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FeatureAction {
    Created,
    Modified,
    Deleted,
}

impl FeatureAction {
    /// The lower-case name, as serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            FeatureAction::Created => "created",
            FeatureAction::Modified => "modified",
            FeatureAction::Deleted => "deleted",
        }
    }
}

/// One changed map feature (an object that is or was a feature).
#[derive(Debug, Clone, Serialize)]
pub struct FeatureEvent {
    pub osm_type: &'static str,
    pub id: i64,
    /// Version after the change (the deleted version for deletes).
    pub version: u32,
    pub action: FeatureAction,
    /// Tiles (both zooms) its old or new geometry touches, as `z/x/y`.
    pub tiles: Vec<String>,
    pub tags_before: Option<BTreeMap<String, String>>,
    pub tags_after: Option<BTreeMap<String, String>>,
}

/// A changed feature as the outbox keeps it (the publisher maps it onto the
/// published message schema).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChangeRecord {
    pub sequence: Option<u64>,
    /// Replication timestamp of the diff (Unix seconds).
    pub timestamp: Option<i64>,
    pub osm_type: String,
    pub id: i64,
    pub version: u32,
    pub action: String,
    pub tiles: Vec<String>,
    pub tags_before: Option<std::collections::BTreeMap<String, String>>,
    pub tags_after: Option<std::collections::BTreeMap<String, String>>,
}

impl ChangeRecord {
    pub fn from_event(e: &FeatureEvent, sequence: Option<u64>, timestamp: Option<i64>) -> Self {
        ChangeRecord {
            sequence,
            timestamp,
            osm_type: e.osm_type.to_string(),
            id: e.id,
            version: e.version,
            action: e.action.as_str().to_string(),
            tiles: e.tiles.clone(),
            tags_before: e.tags_before.clone(),
            tags_after: e.tags_after.clone(),
        }
    }
}
