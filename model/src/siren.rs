//! SIREN MLP and the location encoder (spherical harmonics → SIREN).
//!
//! Why SIREN (Sitzmann et al. 2020, used by SatCLIP): sine activations keep
//! the high-frequency content that the spherical-harmonic features carry,
//! where a ReLU MLP would smooth it away. SIREN only works with its special
//! initialisation, which keeps pre-activations uniformly spread over a few
//! periods of the sine at every depth:
//!
//! * first layer: `W, b ~ U(−1/n, 1/n)` with activation `sin(w0_initial · x)`,
//!   `w0_initial = 30`;
//! * later layers: `W, b ~ U(−√(6/n)/w0, √(6/n)/w0)` with `sin(w0 · x)`;
//!   SatCLIP uses `w0 = 1` for these;
//! * the output layer has the same initialisation and no activation.
//!
//! `n` is the layer's input width. Layer names follow SatCLIP's
//! `SirenNet` (`layers.{i}`, `last_layer`) so weights can be ported.
//! SatCLIP's dropout after every hidden layer is available to training
//! ([`LocationEncoder::forward_train`]), with masks drawn from a seeded
//! generator so that a run stays deterministic and resumable.

use candle_core::{Device, Module, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::params::SplitMix64;
use crate::sh::SphericalHarmonics;

/// Shape and frequencies of a [`Siren`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SirenConfig {
    /// Input width.
    pub in_dim: usize,
    /// Width of the hidden sine layers.
    pub hidden: usize,
    /// Number of hidden sine layers (the first one included).
    pub hidden_layers: usize,
    /// Output width.
    pub out_dim: usize,
    /// Frequency of the first layer.
    pub w0_initial: f64,
    /// Frequency of the later layers.
    pub w0: f64,
}

impl SirenConfig {
    /// SatCLIP/OSMGraphCLIP shape: 2 hidden layers of 512, output 256,
    /// `w0_initial = 30`, `w0 = 1`.
    pub fn satclip(in_dim: usize) -> Self {
        Self {
            in_dim,
            hidden: 512,
            hidden_layers: 2,
            out_dim: 256,
            w0_initial: 30.0,
            w0: 1.0,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.in_dim == 0 || self.hidden == 0 || self.out_dim == 0 || self.hidden_layers == 0 {
            return Err(ModelError::Config(format!(
                "SIREN widths must be > 0: {self:?}"
            )));
        }
        if !(self.w0_initial.is_finite() && self.w0.is_finite() && self.w0 > 0.0) {
            return Err(ModelError::Config(format!("SIREN frequencies: {self:?}")));
        }
        Ok(())
    }
}

/// One SIREN layer: `sin(w0 · (W x + b))`, or `W x + b` for the output layer.
#[derive(Debug, Clone)]
pub struct SirenLayer {
    linear: Linear,
    /// `None` for the (linear) output layer.
    w0: Option<f64>,
}

impl SirenLayer {
    fn new(
        in_dim: usize,
        out_dim: usize,
        w_std: f64,
        w0: Option<f64>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let init = Init::Uniform {
            lo: -w_std,
            up: w_std,
        };
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
        let bias = vb.get_with_hints(out_dim, "bias", init)?;
        Ok(Self {
            linear: Linear::new(weight, Some(bias)),
            w0,
        })
    }

    /// Applies the layer to `[n, in_dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.linear.forward(x)?;
        Ok(match self.w0 {
            Some(w0) => y.affine(w0, 0.0)?.sin()?,
            None => y,
        })
    }
}

/// The SIREN MLP.
#[derive(Debug, Clone)]
pub struct Siren {
    layers: Vec<SirenLayer>,
    last: SirenLayer,
    config: SirenConfig,
}

impl Siren {
    /// Creates (or fetches) the weights under `vb`.
    pub fn new(config: &SirenConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let mut layers = Vec::with_capacity(config.hidden_layers);
        for i in 0..config.hidden_layers {
            let first = i == 0;
            let n = if first { config.in_dim } else { config.hidden };
            let (w0, w_std) = if first {
                (config.w0_initial, 1.0 / n as f64)
            } else {
                (config.w0, (6.0 / n as f64).sqrt() / config.w0)
            };
            layers.push(SirenLayer::new(
                n,
                config.hidden,
                w_std,
                Some(w0),
                vb.pp("layers").pp(i),
            )?);
        }
        let w_std = (6.0 / config.hidden as f64).sqrt() / config.w0;
        let last = SirenLayer::new(
            config.hidden,
            config.out_dim,
            w_std,
            None,
            vb.pp("last_layer"),
        )?;
        Ok(Self {
            layers,
            last,
            config: config.clone(),
        })
    }

    /// `[n, in_dim]` → `[n, out_dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for layer in &self.layers {
            h = layer.forward(&h)?;
        }
        self.last.forward(&h)
    }

    /// [`Siren::forward`] with inverted dropout of rate `p` after every
    /// hidden layer (SatCLIP's `SirenNet(dropout=…)`): each activation is
    /// zeroed with probability `p` and the others scaled by `1/(1−p)`, the
    /// masks drawn from `rng` (so a training step is reproducible).
    pub fn forward_dropout(&self, x: &Tensor, p: f64, rng: &mut SplitMix64) -> Result<Tensor> {
        if !(0.0..1.0).contains(&p) {
            return Err(ModelError::Input(format!("dropout rate {p} not in [0, 1)")));
        }
        let mut h = x.clone();
        for layer in &self.layers {
            h = layer.forward(&h)?;
            if p > 0.0 {
                let keep = (1.0 / (1.0 - p)) as f32;
                let mask: Vec<f32> = (0..h.elem_count())
                    .map(|_| if rng.next_f64() < p { 0.0 } else { keep })
                    .collect();
                let mask = Tensor::from_vec(mask, h.shape(), h.device())?.to_dtype(h.dtype())?;
                h = h.mul(&mask)?;
            }
        }
        self.last.forward(&h)
    }

    /// The configuration.
    pub fn config(&self) -> &SirenConfig {
        &self.config
    }
}

/// Configuration of a [`LocationEncoder`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocationEncoderConfig {
    /// Maximum spherical-harmonic degree `L` (features: `(L+1)²`).
    pub degree: usize,
    /// Hidden width of the SIREN.
    pub hidden: usize,
    /// Number of hidden SIREN layers.
    pub hidden_layers: usize,
    /// Output width (the shared embedding width).
    pub out_dim: usize,
    /// First-layer SIREN frequency.
    pub w0_initial: f64,
    /// Later-layer SIREN frequency.
    pub w0: f64,
    /// L2-normalise the output (what the contrastive loss expects).
    pub normalize: bool,
    /// Dropout rate after every hidden SIREN layer during training (SatCLIP
    /// uses 0.5); 0 for checkpoints from before it existed.
    #[serde(default)]
    pub dropout: f64,
}

impl Default for LocationEncoderConfig {
    /// OSMGraphCLIP's location encoder: L = 10, SIREN 2×512 → 256, normalised.
    fn default() -> Self {
        Self {
            degree: 10,
            hidden: 512,
            hidden_layers: 2,
            out_dim: 256,
            w0_initial: 30.0,
            w0: 1.0,
            normalize: true,
            dropout: 0.0,
        }
    }
}

impl LocationEncoderConfig {
    fn siren(&self) -> SirenConfig {
        SirenConfig {
            in_dim: (self.degree + 1) * (self.degree + 1),
            hidden: self.hidden,
            hidden_layers: self.hidden_layers,
            out_dim: self.out_dim,
            w0_initial: self.w0_initial,
            w0: self.w0,
        }
    }
}

/// Maps `(lat, lon)` in degrees to embeddings: spherical harmonics (computed
/// in `f64`) → SIREN (in the model dtype) → optional L2 normalisation.
#[derive(Debug, Clone)]
pub struct LocationEncoder {
    sh: SphericalHarmonics,
    siren: Siren,
    config: LocationEncoderConfig,
    device: Device,
    dtype: candle_core::DType,
}

impl LocationEncoder {
    /// Creates (or fetches) the weights under `vb` (SIREN weights under
    /// `vb.pp("siren")`).
    pub fn new(config: &LocationEncoderConfig, vb: VarBuilder) -> Result<Self> {
        let siren = Siren::new(&config.siren(), vb.pp("siren"))?;
        Ok(Self {
            sh: SphericalHarmonics::new(config.degree),
            siren,
            config: config.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// Embeds a batch of `(lat, lon)` in degrees: `[n, out_dim]`.
    pub fn forward(&self, coords: &[(f64, f64)]) -> Result<Tensor> {
        let x = self.sh.encode(coords, self.dtype, &self.device)?;
        self.forward_features(&x)
    }

    /// [`LocationEncoder::forward`] as training sees it: with the
    /// configured SIREN dropout, masks from `rng`.
    pub fn forward_train(&self, coords: &[(f64, f64)], rng: &mut SplitMix64) -> Result<Tensor> {
        if self.config.dropout == 0.0 {
            return self.forward(coords);
        }
        let x = self.sh.encode(coords, self.dtype, &self.device)?;
        let y = self.siren.forward_dropout(&x, self.config.dropout, rng)?;
        if self.config.normalize {
            crate::l2_normalize(&y)
        } else {
            Ok(y)
        }
    }

    /// Embeds precomputed harmonic features `[n, (L+1)²]` (lets a trainer
    /// compute the harmonics of a fixed point set once).
    pub fn forward_features(&self, features: &Tensor) -> Result<Tensor> {
        let y = self.siren.forward(features)?;
        if self.config.normalize {
            crate::l2_normalize(&y)
        } else {
            Ok(y)
        }
    }

    /// The spherical harmonics in front of the SIREN.
    pub fn harmonics(&self) -> &SphericalHarmonics {
        &self.sh
    }

    /// The configuration.
    pub fn config(&self) -> &LocationEncoderConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Params;

    #[test]
    fn dropout_is_seeded_and_off_by_default() {
        let p = Params::new(4);
        let cfg = LocationEncoderConfig::default();
        assert_eq!(cfg.dropout, 0.0);
        let enc = LocationEncoder::new(&cfg, p.var_builder(&Device::Cpu)).unwrap();
        let coords = [(47.1, 9.5), (43.7, 7.4), (-20.0, 57.5)];
        let plain = enc.forward(&coords).unwrap().to_vec2::<f32>().unwrap();
        // Rate 0: training's forward is the plain forward, no draw taken.
        let mut rng = SplitMix64::new(1);
        let t = enc.forward_train(&coords, &mut rng).unwrap();
        assert_eq!(t.to_vec2::<f32>().unwrap(), plain);
        assert_eq!(rng.next_u64(), SplitMix64::new(1).next_u64());
        // Rate 0.5: the same seed gives the same output, another differs
        // from it and from the plain forward.
        let cfg = LocationEncoderConfig {
            dropout: 0.5,
            ..cfg
        };
        let enc = LocationEncoder::new(&cfg, p.var_builder(&Device::Cpu)).unwrap();
        let run = |seed| {
            enc.forward_train(&coords, &mut SplitMix64::new(seed))
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        assert_ne!(run(7), plain);
        // Inference ignores dropout.
        assert_eq!(
            enc.forward(&coords).unwrap().to_vec2::<f32>().unwrap(),
            plain
        );
        let x = Tensor::ones((2, 121), candle_core::DType::F32, &Device::Cpu).unwrap();
        let siren = Siren::new(&SirenConfig::satclip(121), p.var_builder(&Device::Cpu)).unwrap();
        assert!(
            siren
                .forward_dropout(&x, 1.0, &mut SplitMix64::new(1))
                .is_err()
        );
    }

    #[test]
    fn siren_init_bounds_and_shapes() {
        let p = Params::new(3);
        let cfg = SirenConfig::satclip(121);
        let siren = Siren::new(&cfg, p.var_builder(&Device::Cpu)).unwrap();
        let t = p.named_tensors();
        let max_abs = |name: &str| {
            t[name]
                .flatten_all()
                .unwrap()
                .abs()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        assert!(max_abs("layers.0.weight") <= 1.0 / 121.0);
        assert!(max_abs("layers.0.weight") > 0.9 / 121.0);
        let hidden = (6.0f64 / 512.0).sqrt();
        assert!(max_abs("layers.1.weight") <= hidden);
        assert!(max_abs("layers.1.weight") > 0.9 * hidden);
        assert!(max_abs("last_layer.weight") <= hidden);
        assert_eq!(t["layers.0.weight"].dims(), &[512, 121]);
        assert_eq!(t["layers.1.weight"].dims(), &[512, 512]);
        assert_eq!(t["last_layer.weight"].dims(), &[256, 512]);
        let x = Tensor::ones((5, 121), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(siren.forward(&x).unwrap().dims(), &[5, 256]);
    }

    #[test]
    fn location_encoder_outputs_unit_vectors_and_is_deterministic() {
        let coords = [(0.0, 0.0), (51.5, -0.12), (-90.0, 0.0), (89.9, 179.9)];
        let run = |degree: usize| {
            let p = Params::new(11);
            let cfg = LocationEncoderConfig {
                degree,
                ..Default::default()
            };
            let enc = LocationEncoder::new(&cfg, p.var_builder(&Device::Cpu)).unwrap();
            enc.forward(&coords).unwrap().to_vec2::<f32>().unwrap()
        };
        for degree in [10, 40] {
            let a = run(degree);
            assert_eq!(a.len(), 4);
            for row in &a {
                assert_eq!(row.len(), 256);
                assert!(row.iter().all(|v| v.is_finite()));
                let n: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
                assert!((n - 1.0).abs() < 1e-5);
            }
            assert_eq!(a, run(degree));
        }
    }

    #[test]
    fn f64_model_and_checkpoint_round_trip() {
        let dev = Device::Cpu;
        let coords = [(10.0, 20.0), (-45.0, 170.0)];
        let cfg = LocationEncoderConfig::default();
        // OSMGraphCLIP runs its location encoder in float64: supported.
        let p64 = Params::new(2);
        let enc64 = LocationEncoder::new(
            &cfg,
            p64.var_builder_with_dtype(candle_core::DType::F64, &dev),
        )
        .unwrap();
        let y = enc64.forward(&coords).unwrap();
        assert_eq!(y.dtype(), candle_core::DType::F64);

        let dir = std::env::temp_dir().join(format!("osmvec-loc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("loc.safetensors");
        let a = Params::new(2);
        let enc_a = LocationEncoder::new(&cfg, a.var_builder(&dev)).unwrap();
        a.save(&path, &Default::default()).unwrap();
        let b = Params::new(3);
        let enc_b = LocationEncoder::new(&cfg, b.var_builder(&dev)).unwrap();
        let bits = |e: &LocationEncoder| -> Vec<u32> {
            e.forward(&coords)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        assert_ne!(bits(&enc_a), bits(&enc_b));
        b.load(&path).unwrap();
        assert_eq!(bits(&enc_a), bits(&enc_b));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
