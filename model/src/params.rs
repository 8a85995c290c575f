//! Model weights: a candle [`VarMap`] with deterministic, seeded initialisation
//! and strict safetensors checkpoints.
//!
//! Why not candle's own initialisers: candle's CPU backend has no seedable RNG
//! (`Device::Cpu.set_seed` returns an error), so two processes that build the
//! "same" model would get different weights. The daemon needs reproducible
//! models (a re-embed sweep after a restart must not silently move the
//! embedding space), so [`Params`] plugs a custom [`SimpleBackend`] into
//! [`VarBuilder`]: every variable is drawn from its own SplitMix64 stream,
//! seeded from the model seed and the variable's full name. The weights thus
//! depend on (seed, name, shape, init) only, not on construction order, device
//! or thread scheduling. Every candle [`Init`] (constant, uniform, normal,
//! Kaiming) is honoured with the same formulas as candle/PyTorch.
//!
//! Checkpoints are safetensors files with string metadata (model version,
//! config JSON, ...). Loading is strict: the file must hold exactly the
//! variables the model created, with the same shapes and dtypes, so a
//! checkpoint of another architecture is an error rather than a half-loaded
//! model.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use crate::error::{ModelError, Result};

/// The model's weights: a [`VarMap`] plus the seed that initialises every
/// variable created through [`Params::var_builder`].
///
/// Cloning is cheap and shares the variables (like `VarMap`).
#[derive(Clone)]
pub struct Params {
    varmap: VarMap,
    seed: u64,
}

impl std::fmt::Debug for Params {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Params")
            .field("seed", &self.seed)
            .field("variables", &self.len())
            .finish()
    }
}

impl Params {
    /// An empty parameter store whose variables will be initialised from `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            varmap: VarMap::new(),
            seed,
        }
    }

    /// The initialisation seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// A [`VarBuilder`] in the model dtype ([`crate::MODEL_DTYPE`]) that creates
    /// missing variables deterministically and returns existing ones.
    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        self.var_builder_with_dtype(crate::MODEL_DTYPE, device)
    }

    /// Like [`Params::var_builder`] with an explicit dtype.
    pub fn var_builder_with_dtype(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(
            Box::new(SeededBackend {
                varmap: self.varmap.clone(),
                seed: self.seed,
            }),
            dtype,
            device.clone(),
        )
    }

    /// The underlying candle [`VarMap`].
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// Every variable, sorted by name (a stable order for optimisers).
    pub fn all_vars(&self) -> Vec<Var> {
        self.named_vars().into_values().collect()
    }

    /// Every variable by name, sorted.
    pub fn named_vars(&self) -> BTreeMap<String, Var> {
        let data = lock(&self.varmap);
        data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Every variable's current value by name, sorted.
    pub fn named_tensors(&self) -> BTreeMap<String, Tensor> {
        let data = lock(&self.varmap);
        data.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Number of variables.
    pub fn len(&self) -> usize {
        lock(&self.varmap).len()
    }

    /// Whether no variable has been created yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total number of scalar parameters.
    pub fn num_parameters(&self) -> usize {
        lock(&self.varmap)
            .values()
            .map(|v| v.as_tensor().elem_count())
            .sum()
    }

    /// Serialises every variable as safetensors bytes with `metadata`.
    pub fn to_safetensors(&self, metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
        let tensors = self.named_tensors();
        let info: HashMap<String, String> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        safetensors::tensor::serialize(tensors.iter(), Some(info)).map_err(|e| {
            ModelError::Checkpoint {
                path: "<memory>".into(),
                reason: e.to_string(),
            }
        })
    }

    /// Writes a safetensors checkpoint. The file is written next to `path` and
    /// renamed over it, so a crash never leaves a truncated checkpoint behind.
    pub fn save(&self, path: impl AsRef<Path>, metadata: &BTreeMap<String, String>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_safetensors(metadata)?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let io = |e: std::io::Error| ModelError::Checkpoint {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(())
    }

    /// Loads a checkpoint written by [`Params::save`] into the existing
    /// variables and returns its metadata. Strict: the file must hold exactly
    /// this store's variables with the same shapes and dtypes.
    pub fn load(&self, path: impl AsRef<Path>) -> Result<BTreeMap<String, String>> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| ModelError::Checkpoint {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        self.load_bytes(&bytes).map_err(|e| match e {
            ModelError::Checkpoint { reason, .. } => ModelError::Checkpoint {
                path: path.to_path_buf(),
                reason,
            },
            other => other,
        })
    }

    /// [`Params::load`] from bytes in memory.
    pub fn load_bytes(&self, bytes: &[u8]) -> Result<BTreeMap<String, String>> {
        let err = |reason: String| ModelError::Checkpoint {
            path: "<memory>".into(),
            reason,
        };
        let metadata = safetensors_metadata(bytes).map_err(err)?;
        let data = lock(&self.varmap);
        let device = match data.values().next() {
            Some(v) => v.device().clone(),
            None => return Err(err("the model has no variables to load into".into())),
        };
        let loaded = candle_core::safetensors::load_buffer(bytes, &device)
            .map_err(|e| err(e.to_string()))?;
        let mut missing: Vec<&str> = data
            .keys()
            .filter(|k| !loaded.contains_key(*k))
            .map(String::as_str)
            .collect();
        let mut extra: Vec<&str> = loaded
            .keys()
            .filter(|k| !data.contains_key(*k))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() || !extra.is_empty() {
            missing.sort_unstable();
            extra.sort_unstable();
            return Err(err(format!(
                "variables do not match the model: missing {missing:?}, unexpected {extra:?}"
            )));
        }
        for (name, var) in data.iter() {
            let t = &loaded[name];
            if t.shape() != var.shape() || t.dtype() != var.dtype() {
                return Err(err(format!(
                    "{name}: file has {:?} {:?}, model has {:?} {:?}",
                    t.dtype(),
                    t.shape(),
                    var.dtype(),
                    var.shape()
                )));
            }
        }
        for (name, var) in data.iter() {
            var.set(&loaded[name])?;
        }
        Ok(metadata)
    }
}

/// Reads only the metadata of a safetensors checkpoint (to learn the config
/// before building the model that will load it).
pub fn read_metadata(path: impl AsRef<Path>) -> Result<BTreeMap<String, String>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| ModelError::Checkpoint {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    safetensors_metadata(&bytes).map_err(|reason| ModelError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    })
}

fn safetensors_metadata(bytes: &[u8]) -> std::result::Result<BTreeMap<String, String>, String> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    Ok(meta
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default())
}

fn lock(varmap: &VarMap) -> std::sync::MutexGuard<'_, HashMap<String, Var>> {
    // A poisoned lock only means another thread panicked while holding it;
    // the map itself is still consistent (inserts are single operations).
    varmap
        .data()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The [`SimpleBackend`] behind [`Params::var_builder`].
struct SeededBackend {
    varmap: VarMap,
    seed: u64,
}

impl SimpleBackend for SeededBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = lock(&self.varmap);
        if let Some(var) = data.get(name) {
            if var.shape() != &shape {
                candle_core::bail!(
                    "shape mismatch on {name}: requested {shape:?}, stored {:?}",
                    var.shape()
                )
            }
            return Ok(var.as_tensor().clone());
        }
        let values = seeded_values(self.seed, name, &shape, init);
        let tensor = Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&tensor)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let data = lock(&self.varmap);
        match data.get(name) {
            Some(var) => var.as_tensor().to_dtype(dtype)?.to_device(dev),
            None => candle_core::bail!("no variable named {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        lock(&self.varmap).contains_key(name)
    }
}

/// The initial values of one variable, computed in `f64`.
pub(crate) fn seeded_values(seed: u64, name: &str, shape: &Shape, init: Init) -> Vec<f64> {
    let n = shape.elem_count();
    let mut rng = SplitMix64::new(seed ^ fnv1a64(name.as_bytes()));
    let uniform = |rng: &mut SplitMix64, lo: f64, up: f64| -> Vec<f64> {
        (0..n).map(|_| lo + (up - lo) * rng.next_f64()).collect()
    };
    let normal = |rng: &mut SplitMix64, mean: f64, std: f64| -> Vec<f64> {
        (0..n).map(|_| mean + std * rng.next_normal()).collect()
    };
    match init {
        Init::Const(c) => vec![c; n],
        Init::Uniform { lo, up } => uniform(&mut rng, lo, up),
        Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let fan = fan.for_shape(shape).max(1) as f64;
            let std = non_linearity.gain() / fan.sqrt();
            match dist {
                candle_nn::init::NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(&mut rng, -bound, bound)
                }
                candle_nn::init::NormalOrUniform::Normal => normal(&mut rng, 0.0, std),
            }
        }
    }
}

/// FNV-1a, a stable (across Rust versions and platforms) hash of variable names.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// SplitMix64 (Steele, Lea & Flood 2014): tiny, fast, and good enough for
/// weight initialisation. Also used by the tests to make random inputs.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box–Muller).
    pub fn next_normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]: ln is finite
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Uniform integer in `0..n` (`n > 0`).
    pub fn next_below(&mut self, n: u64) -> u64 {
        // Multiply-shift; the bias is < n / 2^64, irrelevant here.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_weights_regardless_of_order() {
        let dev = Device::Cpu;
        let a = Params::new(7);
        let vb = a.var_builder(&dev);
        let x = vb
            .get_with_hints((4, 3), "x", candle_nn::init::DEFAULT_KAIMING_NORMAL)
            .unwrap();
        let y = vb
            .get_with_hints(5, "y", Init::Uniform { lo: -1.0, up: 1.0 })
            .unwrap();
        let b = Params::new(7);
        let vb = b.var_builder(&dev);
        let y2 = vb
            .get_with_hints(5, "y", Init::Uniform { lo: -1.0, up: 1.0 })
            .unwrap();
        let x2 = vb
            .get_with_hints((4, 3), "x", candle_nn::init::DEFAULT_KAIMING_NORMAL)
            .unwrap();
        assert_eq!(
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            x2.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert_eq!(y.to_vec1::<f32>().unwrap(), y2.to_vec1::<f32>().unwrap());
        let c = Params::new(8);
        let y3 = c
            .var_builder(&dev)
            .get_with_hints(5, "y", Init::Uniform { lo: -1.0, up: 1.0 })
            .unwrap();
        assert_ne!(y.to_vec1::<f32>().unwrap(), y3.to_vec1::<f32>().unwrap());
        for v in y.to_vec1::<f32>().unwrap() {
            assert!((-1.0..1.0).contains(&v));
        }
    }

    #[test]
    fn same_name_returns_same_variable() {
        let p = Params::new(1);
        let vb = p.var_builder(&Device::Cpu);
        let a = vb.get_with_hints(3, "w", Init::Const(0.5)).unwrap();
        let b = vb.get_with_hints(3, "w", Init::Const(9.0)).unwrap();
        assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        assert!(vb.get_with_hints(4, "w", Init::Const(0.0)).is_err());
        assert_eq!(p.len(), 1);
        assert_eq!(p.num_parameters(), 3);
    }

    #[test]
    fn normal_init_has_the_requested_moments() {
        let v = seeded_values(
            3,
            "n",
            &Shape::from(20_000),
            Init::Randn {
                mean: 1.0,
                stdev: 2.0,
            },
        );
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!((mean - 1.0).abs() < 0.05, "mean {mean}");
        assert!((var.sqrt() - 2.0).abs() < 0.05, "std {}", var.sqrt());
    }

    #[test]
    fn strict_load_rejects_other_architectures() {
        let dir = std::env::temp_dir().join(format!("osmvec-params-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.safetensors");
        let a = Params::new(1);
        a.var_builder(&Device::Cpu)
            .get_with_hints(3, "w", Init::Const(0.5))
            .unwrap();
        let mut meta = BTreeMap::new();
        meta.insert("k".to_string(), "v".to_string());
        a.save(&path, &meta).unwrap();
        assert_eq!(read_metadata(&path).unwrap(), meta);

        let b = Params::new(2);
        b.var_builder(&Device::Cpu)
            .get_with_hints(3, "other", Init::Const(0.0))
            .unwrap();
        let e = b.load(&path).unwrap_err().to_string();
        assert!(e.contains("missing") && e.contains("other"), "{e}");

        let c = Params::new(2);
        c.var_builder(&Device::Cpu)
            .get_with_hints(4, "w", Init::Const(0.0))
            .unwrap();
        assert!(c.load(&path).is_err());

        let d = Params::new(2);
        let w = d
            .var_builder(&Device::Cpu)
            .get_with_hints(3, "w", Init::Const(0.0))
            .unwrap();
        assert_eq!(d.load(&path).unwrap(), meta);
        // The tensor handed out before the load sees the loaded values.
        assert_eq!(w.to_vec1::<f32>().unwrap(), vec![0.5; 3]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
