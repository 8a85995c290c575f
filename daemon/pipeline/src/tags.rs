//! From OSM tags to a feature's text vector.
//!
//! Every tag becomes a short text, `key=value` (the notation the pretrained
//! model has seen on the OSM wiki and taginfo), embedded once by
//! all-MiniLM-L6-v2 and cached in the store. A feature's vector is the mean of
//! its tags' vectors weighted by `ln(1 + global key count)`, as in GeoLink and
//! OSMGraphCLIP: common keys (`building`, `highway`) say more about a place
//! than rare ones.
//!
//! Two kinds of keys are treated differently ([`TagPolicy`]):
//!
//! * **dropped** keys carry no meaning about the place (`source`,
//!   `created_by`, `note`, `fixme`, ...);
//! * **key-only** keys have (nearly) unique values: names, addresses, phone
//!   numbers, URLs. Their value would only add a text vector per object
//!   (hundreds of thousands for a country), so they are embedded as the key
//!   alone: "has a name", "has a house number" is what they tell a model.
//!
//! Both lists are configurable and saved in the checkpoint, so a model always
//! sees tags the way it was trained.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use anyhow::{Context, Result};
use osmvec_graphstore::Store;
use osmvec_graphstore::element::Tags;
use osmvec_model::Device;
use osmvec_model::text::{TEXT_DIM, TagEncoder, TextVector, weighted_mean};
use serde::{Deserialize, Serialize};

/// Identity of the text model in the store's vector cache.
pub const TEXT_MODEL: &str = "all-MiniLM-L6-v2";

/// How a feature's tags become texts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TagTexts {
    /// One text per kept tag (`key=value`, or the key alone for keys with
    /// near-unique values), averaged by key weight: osmvec's policy.
    #[default]
    PerTag,
    /// One text per feature, as OSMGraphCLIP builds its labels
    /// (`osmgraphclip/osm_tags.py`, `_label_from_row`): the feature's values
    /// of [`SEMANTIC_KEYS`] in that order and one name (`name:en`, else
    /// `name`, else the first `name:xx`), joined by `"; "`; a `yes` value
    /// gives the key alone.
    FeatureLabel,
}

/// OSMGraphCLIP's 30 tag columns (`OSM_TAG_COLUMNS`), in its order.
pub const SEMANTIC_KEYS: [&str; 30] = [
    "amenity",
    "building",
    "highway",
    "landuse",
    "railway",
    "public_transport",
    "waterway",
    "water",
    "telecom",
    "leisure",
    "natural",
    "shop",
    "tourism",
    "historic",
    "man_made",
    "power",
    "barrier",
    "aeroway",
    "military",
    "office",
    "place",
    "sport",
    "religion",
    "boundary",
    "surface",
    "service",
    "denomination",
    "craft",
    "emergency",
    "healthcare",
];

/// Which tags are dropped or embedded by key only (a pattern ending in `*`
/// matches every key with that prefix), or whether each feature is one text
/// ([`TagTexts::FeatureLabel`], which ignores both lists).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TagPolicy {
    pub drop_keys: Vec<String>,
    pub key_only_keys: Vec<String>,
    /// Checkpoints from before this choice existed are `per-tag`.
    #[serde(default)]
    pub texts: TagTexts,
}

impl Default for TagPolicy {
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        TagPolicy {
            drop_keys: s(&[
                "source*",
                "created_by",
                "note*",
                "fixme*",
                "FIXME*",
                "attribution",
                "check_date*",
                "import*",
                "mapillary*",
                "survey*",
                "tiger:*",
                "gnis:*",
            ]),
            key_only_keys: s(&[
                "name*",
                "alt_name*",
                "old_name*",
                "official_name*",
                "short_name*",
                "loc_name*",
                "int_name*",
                "nat_name*",
                "reg_name*",
                "addr:*",
                "contact:*",
                "phone",
                "fax",
                "email",
                "website*",
                "url",
                "wikidata",
                "wikipedia*",
                "wikimedia_commons",
                "image",
                "ref*",
                "description*",
                "inscription*",
                "opening_hours*",
                "operator*",
                "brand*",
                "network*",
                "start_date",
                "height",
                "ele",
                "level",
                "building:levels",
                "capacity",
                "maxspeed",
                "postal_code",
                "population*",
                "colour",
                "roof:*",
                "width",
                "lanes*",
                "layer",
                "collection_times",
                "service_times",
                "osmc:symbol",
                "route_ref",
            ]),
            texts: TagTexts::PerTag,
        }
    }
}

/// The one text of a feature under [`TagTexts::FeatureLabel`], or None for
/// a feature with no semantic key and no name.
pub fn feature_label(tags: &Tags) -> Option<String> {
    let get = |k: &str| tags.iter().find(|(key, _)| key == k).map(|(_, v)| v.trim());
    let mut parts: Vec<String> = SEMANTIC_KEYS
        .iter()
        .filter_map(|k| {
            let v = get(k).filter(|v| !v.is_empty())?;
            Some(if matches!(v, "yes" | "true" | "1") {
                k.to_string()
            } else {
                osmvec_model::text::tag_text(k, v)
            })
        })
        .collect();
    let name = get("name:en")
        .filter(|v| !v.is_empty())
        .map(|v| ("name:en", v))
        .or_else(|| get("name").filter(|v| !v.is_empty()).map(|v| ("name", v)))
        .or_else(|| {
            let mut variants: Vec<(&str, &str)> = tags
                .iter()
                .filter(|(k, v)| {
                    k.strip_prefix("name:").is_some_and(|l| {
                        (2..=3).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_lowercase())
                    }) && !v.trim().is_empty()
                })
                .map(|(k, v)| (k.as_str(), v.trim()))
                .collect();
            variants.sort();
            variants.first().copied()
        });
    if let Some((k, v)) = name {
        parts.push(osmvec_model::text::tag_text(k, v));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

fn matches(patterns: &[String], key: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => key.starts_with(prefix),
        None => p == key,
    })
}

impl TagPolicy {
    /// The texts to embed for `tags`, with the key each came from; sorted and
    /// without repeats, so equal tag sets give equal vectors.
    pub fn texts(&self, tags: &Tags) -> Vec<(String, String)> {
        if self.texts == TagTexts::FeatureLabel {
            // One text: the weight of its key does not matter.
            return feature_label(tags)
                .map(|t| vec![(t, "label".to_string())])
                .unwrap_or_default();
        }
        let mut out: Vec<(String, String)> = tags
            .iter()
            .filter(|(k, _)| !matches(&self.drop_keys, k))
            .map(|(k, v)| {
                let text = if matches(&self.key_only_keys, k) {
                    k.clone()
                } else {
                    osmvec_model::text::tag_text(k, v)
                };
                (text, k.clone())
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// `ln(1 + count)` of every key, from counts taken over the store when the
/// model was trained (kept in the checkpoint, so an embedding does not change
/// when other tiles are edited).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyWeights {
    pub counts: BTreeMap<String, u64>,
}

impl KeyWeights {
    pub fn weight(&self, key: &str) -> f32 {
        let n = self.counts.get(key).copied().unwrap_or(1).max(1);
        (1.0 + n as f64).ln() as f32
    }
}

/// Tag texts → vectors: an in-memory map in front of the store's cache in
/// front of the text model, which is loaded only when a text is missing from
/// both (a warm store never loads it); and each distinct tag set's feature
/// vector, computed once (a country has far fewer distinct tag sets than
/// features). Both maps are bounded ([`TagVectors::max_texts`],
/// [`TagVectors::max_sets`]): full, they are emptied before the next batch
/// fills them again.
pub struct TagVectors {
    memory: HashMap<String, Arc<TextVector>>,
    sets: HashMap<Tags, Arc<TextVector>>,
    encoder: Option<TagEncoder>,
    model_dir: std::path::PathBuf,
    device: Device,
    /// Texts encoded by the model in this process.
    pub encoded: u64,
    /// Most text vectors kept in memory (1.5 KB each).
    pub max_texts: usize,
    /// Most tag-set vectors kept in memory (1.5 KB each plus the tags).
    pub max_sets: usize,
}

impl TagVectors {
    pub fn new(model_dir: std::path::PathBuf, device: Device) -> Self {
        TagVectors {
            memory: HashMap::new(),
            sets: HashMap::new(),
            encoder: None,
            model_dir,
            device,
            encoded: 0,
            max_texts: 262_144,
            max_sets: 262_144,
        }
    }

    /// Forget the tag-set vectors (they depend on the policy and key
    /// weights of the model they were computed for).
    pub fn clear_sets(&mut self) {
        self.sets.clear();
    }

    /// Texts and tag sets held in memory.
    pub fn cached(&self) -> (usize, usize) {
        (self.memory.len(), self.sets.len())
    }

    /// Makes the feature vector of every tag set in `tags` available to
    /// [`TagVectors::feature_vector`] (text vectors from the store or the
    /// model first).
    pub fn ensure_sets<'a>(
        &mut self,
        store: Option<&Store>,
        policy: &TagPolicy,
        weights: &KeyWeights,
        tags: &[&'a Tags],
    ) -> Result<()> {
        let collect = |sets: &HashMap<Tags, Arc<TextVector>>| {
            let mut seen: HashSet<&'a Tags> = HashSet::new();
            tags.iter()
                .copied()
                .filter(|t| !sets.contains_key(*t) && seen.insert(*t))
                .collect::<Vec<&'a Tags>>()
        };
        let mut new_sets = collect(&self.sets);
        if new_sets.is_empty() {
            return Ok(());
        }
        if self.sets.len() + new_sets.len() > self.max_sets {
            // Emptied first, then everything this batch needs is computed.
            self.sets.clear();
            new_sets = collect(&self.sets);
        }
        let texts: HashSet<String> = new_sets
            .iter()
            .flat_map(|t| policy.texts(t).into_iter().map(|(text, _)| text))
            .collect();
        self.ensure(store, &texts)?;
        let this = &*self;
        let computed: Vec<TextVector> = {
            use rayon::prelude::*;
            new_sets
                .par_iter()
                .map(|t| this.compute_feature_vector(policy, weights, t))
                .collect()
        };
        for (t, v) in new_sets.into_iter().zip(computed) {
            self.sets.insert(t.clone(), Arc::new(v));
        }
        Ok(())
    }

    /// Makes every text in `texts` available, encoding what the store (when
    /// there is one: a worker has none) does not hold yet (in batches, with a
    /// progress bar when there are many).
    pub fn ensure(&mut self, store: Option<&Store>, texts: &HashSet<String>) -> Result<()> {
        let mut missing: Vec<&str> = texts
            .iter()
            .filter(|t| !self.memory.contains_key(t.as_str()))
            .map(|t| t.as_str())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if self.memory.len() + missing.len() > self.max_texts {
            self.memory.clear();
            missing = texts.iter().map(|t| t.as_str()).collect();
        }
        let mut to_encode = Vec::new();
        for chunk in missing.chunks(4096) {
            let Some(store) = store else {
                to_encode.extend(chunk.iter().map(|t| t.to_string()));
                continue;
            };
            let got = store.tag_vectors(TEXT_MODEL, chunk)?;
            for (text, v) in chunk.iter().zip(got) {
                match v {
                    Some(v) if v.len() == TEXT_DIM => {
                        let mut a = [0f32; TEXT_DIM];
                        a.copy_from_slice(&v);
                        self.memory.insert(text.to_string(), Arc::new(a));
                    }
                    _ => to_encode.push(text.to_string()),
                }
            }
        }
        if to_encode.is_empty() {
            return Ok(());
        }
        to_encode.sort();
        if self.encoder.is_none() {
            let enc = TagEncoder::load(&self.model_dir, &self.device)
                .context("loading the tag text model")?;
            self.encoder = Some(enc);
        }
        let enc = self.encoder.as_ref().expect("just loaded");
        tracing::info!(
            texts = to_encode.len(),
            "encoding new tag texts with {TEXT_MODEL}"
        );
        // A first training on a large store encodes thousands of texts
        // (about a minute per 10,000 on 2 cores): progress in the log.
        let started = std::time::Instant::now();
        let mut last_log = started;
        for chunk in to_encode.chunks(64) {
            let refs: Vec<&str> = chunk.iter().map(|s| s.as_str()).collect();
            let vecs = enc.encode(&refs)?;
            let items: Vec<(String, Vec<f32>)> = chunk
                .iter()
                .zip(&vecs)
                .map(|(t, v)| (t.clone(), v.to_vec()))
                .collect();
            if let Some(store) = store {
                store.put_tag_vectors(TEXT_MODEL, &items)?;
            }
            for (t, v) in chunk.iter().zip(vecs) {
                self.memory.insert(t.clone(), Arc::new(v));
            }
            self.encoded += chunk.len() as u64;
            if last_log.elapsed().as_secs() >= 10 {
                last_log = std::time::Instant::now();
                tracing::info!(
                    done = self.encoded,
                    texts = to_encode.len(),
                    seconds = started.elapsed().as_secs_f64(),
                    "encoding tag texts"
                );
            }
        }
        Ok(())
    }

    /// The feature vector of `tags` (zeros when no tag is left after the
    /// policy): from the tag-set cache, else computed (every text must have
    /// been [`TagVectors::ensure`]d).
    pub fn feature_vector(
        &self,
        policy: &TagPolicy,
        weights: &KeyWeights,
        tags: &Tags,
    ) -> TextVector {
        match self.sets.get(tags) {
            Some(v) => **v,
            None => self.compute_feature_vector(policy, weights, tags),
        }
    }

    fn compute_feature_vector(
        &self,
        policy: &TagPolicy,
        weights: &KeyWeights,
        tags: &Tags,
    ) -> TextVector {
        let texts = policy.texts(tags);
        let mut vecs = Vec::with_capacity(texts.len());
        let mut ws = Vec::with_capacity(texts.len());
        for (text, key) in &texts {
            if let Some(v) = self.memory.get(text) {
                vecs.push(**v);
                ws.push(weights.weight(key));
            }
        }
        weighted_mean(&vecs, &ws).unwrap_or([0f32; TEXT_DIM])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use osmvec_graphstore::element::tags_of as tags;

    /// Cafe Ekberg, node 151006533 v13 of helsinki-centre-2019-04-21 (©
    /// OpenStreetMap contributors, ODbL), tags as stored.
    fn ekberg() -> Tags {
        [
            ("addr:city", "Helsinki"),
            ("addr:country", "FI"),
            ("addr:housenumber", "9"),
            ("addr:postcode", "00120"),
            ("addr:street", "Bulevardi"),
            ("amenity", "cafe"),
            ("name", "Cafe Ekberg"),
            (
                "opening_hours",
                "Mo-Fr 7:30-19:00;Sa 8:30-17:00;Su 9:00-17:00",
            ),
            ("website", "http://www.cafeekberg.fi/"),
            ("wheelchair", "limited"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn feature_label_is_one_text_with_the_semantic_keys_and_a_name() {
        let tags = ekberg();
        let per_tag = TagPolicy::default().texts(&tags);
        // osmvec's policy: one text per kept tag, names and addresses by key.
        assert_eq!(per_tag.len(), 10, "{per_tag:?}");
        let label = TagPolicy {
            texts: TagTexts::FeatureLabel,
            ..TagPolicy::default()
        };
        assert_eq!(
            label.texts(&tags),
            vec![(
                "amenity=cafe; name=Cafe Ekberg".to_string(),
                "label".to_string()
            )]
        );
        // `yes` gives the key alone; name:en wins over name; keys in
        // OSMGraphCLIP's order (building before shop).
        let t: Tags = [
            ("shop", "bakery"),
            ("building", "yes"),
            ("name", "Leipomo"),
            ("name:en", "Bakery"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            feature_label(&t).as_deref(),
            Some("building; shop=bakery; name:en=Bakery")
        );
        // Nothing semantic and no name: no text (the feature has no vector).
        let t: Tags = vec![("wheelchair".into(), "yes".into())];
        assert_eq!(feature_label(&t), None);
        // Old checkpoints read as per-tag.
        let mut v = serde_json::to_value(TagPolicy::default()).unwrap();
        v.as_object_mut().unwrap().remove("texts");
        let p: TagPolicy = serde_json::from_value(v).unwrap();
        assert_eq!(p.texts, TagTexts::PerTag);
    }

    #[test]
    fn policy_drops_and_shortens() {
        let p = TagPolicy::default();
        let t = p.texts(&tags(&[
            ("amenity", "cafe"),
            ("name", "Café Central"),
            ("name:de", "Kaffeehaus"),
            ("source", "survey"),
            ("addr:street", "Main Street"),
        ]));
        let texts: Vec<&str> = t.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(texts, ["addr:street", "amenity=cafe", "name", "name:de"]);
        assert!(p.texts(&tags(&[("created_by", "JOSM")])).is_empty());
    }

    #[test]
    fn weights_are_log_counts() {
        let mut w = KeyWeights::default();
        w.counts.insert("building".into(), 99);
        assert!((w.weight("building") - (100f64).ln() as f32).abs() < 1e-6);
        assert!((w.weight("unseen") - (2f64).ln() as f32).abs() < 1e-6);
    }
}
