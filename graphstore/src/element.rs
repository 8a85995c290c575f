//! OSM element types shared by every reader, the store and the exporters.
//!
//! Coordinates are kept in OSM's own fixed-point form (1e-7 degrees in an
//! `i32`), exactly as PBF and the API store them, so that a round trip through
//! the store and out as OPL reproduces osmium's output digit for digit.

/// Fixed-point scale of OSM coordinates: 1e-7 degrees per unit.
pub const COORD_SCALE: f64 = 1e7;

/// The three kinds of OSM object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ElementType {
    Node,
    Way,
    Relation,
}

impl ElementType {
    /// The one-letter code used by OPL and by our RocksDB keys.
    pub fn letter(self) -> char {
        match self {
            ElementType::Node => 'n',
            ElementType::Way => 'w',
            ElementType::Relation => 'r',
        }
    }

    pub fn from_letter(c: char) -> Option<Self> {
        match c {
            'n' => Some(ElementType::Node),
            'w' => Some(ElementType::Way),
            'r' => Some(ElementType::Relation),
            _ => None,
        }
    }

    /// The name used in OSM XML (`node`, `way`, `relation`).
    pub fn xml_name(self) -> &'static str {
        match self {
            ElementType::Node => "node",
            ElementType::Way => "way",
            ElementType::Relation => "relation",
        }
    }
}

/// Ordered `key=value` pairs, in the order the source file gave them.
pub type Tags = Vec<(String, String)>;

/// Tags from string pairs (tests and examples).
pub fn tags_of(kv: &[(&str, &str)]) -> Tags {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Metadata common to every object. Only the version matters for
/// correctness (it decides which copy of an object wins); the timestamp is
/// kept for change events and is 0 when the source has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Meta {
    pub version: u32,
    /// Seconds since the Unix epoch, 0 if unknown.
    pub timestamp: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub id: i64,
    pub meta: Meta,
    /// Latitude in 1e-7 degrees.
    pub lat: i32,
    /// Longitude in 1e-7 degrees.
    pub lon: i32,
    pub tags: Tags,
}

impl Node {
    pub fn lat_deg(&self) -> f64 {
        self.lat as f64 / COORD_SCALE
    }
    pub fn lon_deg(&self) -> f64 {
        self.lon as f64 / COORD_SCALE
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Way {
    pub id: i64,
    pub meta: Meta,
    pub refs: Vec<i64>,
    pub tags: Tags,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub kind: ElementType,
    pub id: i64,
    pub role: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: i64,
    pub meta: Meta,
    pub members: Vec<Member>,
    pub tags: Tags,
}

/// One OSM object of any kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Element {
    Node(Node),
    Way(Way),
    Relation(Relation),
}

impl Element {
    pub fn kind(&self) -> ElementType {
        match self {
            Element::Node(_) => ElementType::Node,
            Element::Way(_) => ElementType::Way,
            Element::Relation(_) => ElementType::Relation,
        }
    }
    pub fn id(&self) -> i64 {
        match self {
            Element::Node(n) => n.id,
            Element::Way(w) => w.id,
            Element::Relation(r) => r.id,
        }
    }
    pub fn meta(&self) -> Meta {
        match self {
            Element::Node(n) => n.meta,
            Element::Way(w) => w.meta,
            Element::Relation(r) => r.meta,
        }
    }
    pub fn tags(&self) -> &Tags {
        match self {
            Element::Node(n) => &n.tags,
            Element::Way(w) => &w.tags,
            Element::Relation(r) => &r.tags,
        }
    }
}

/// What an osmChange file asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Modify,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Modify => "modify",
            Action::Delete => "delete",
        }
    }
}

/// One entry of an osmChange file. For deletes, `element` carries whatever
/// the file gave (id and version always, coordinates and tags sometimes);
/// only its id and version are used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub action: Action,
    pub element: Element,
}

/// Header facts of an extract that matter for replication.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileHeader {
    /// `osmosis_replication_timestamp`, seconds since the epoch.
    pub replication_timestamp: Option<i64>,
    /// `osmosis_replication_sequence_number`.
    pub replication_sequence: Option<u64>,
    /// `osmosis_replication_base_url`.
    pub replication_base_url: Option<String>,
}
