//! Evaluation math for `osmvec eval`: how well a trained model's embeddings
//! do compared with baselines, on plain `f32` rows (no candle, no GPU).
//!
//! * [`retrieval_topk`]: location→graph (or any paired) retrieval, the direct
//!   measure of what the contrastive objective optimises.
//! * [`train_probe`] / [`LinearProbe`]: a linear probe (multinomial logistic
//!   regression), the standard way to ask "how much of a label is *linearly*
//!   readable from an embedding" without letting a downstream model's own
//!   capacity blur the comparison between embeddings.
//! * [`classification_scores`]: accuracy and macro-F1 (macro because land-use
//!   classes are imbalanced and accuracy alone rewards predicting the majority).
//! * [`probe_over_seeds`]: the probe repeated over seeds, reported as mean ± std,
//!   so that a difference between two embeddings can be told from seed noise.
//!
//! Everything is deterministic: the same inputs and seed give bit-identical
//! results (single-threaded, fixed summation order).

use serde::Serialize;

use crate::error::{ModelError, Result};
use crate::params::SplitMix64;

/// Number of rows of a row-major `[n, dim]` buffer, or an error naming `what`.
fn rows(data: &[f32], dim: usize, what: &str) -> Result<usize> {
    if dim == 0 {
        return Err(ModelError::Input(format!("{what}: dim must be > 0")));
    }
    if !data.len().is_multiple_of(dim) {
        return Err(ModelError::Input(format!(
            "{what}: length {} is not a multiple of dim {dim}",
            data.len()
        )));
    }
    Ok(data.len() / dim)
}

/// `Σ a_i b_i` in `f64` with four independent accumulators: the fixed
/// grouping keeps results deterministic while letting the compiler vectorise.
#[inline]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f64; 4];
    let ca = a.chunks_exact(4);
    let cb = b.chunks_exact(4);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        acc[0] += x[0] * y[0];
        acc[1] += x[1] * y[1];
        acc[2] += x[2] * y[2];
        acc[3] += x[3] * y[3];
    }
    let mut tail = 0.0;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// Top-k retrieval accuracy of paired embeddings.
///
/// `queries` and `keys` are row-major `[n, dim]`; the correct key of query `i`
/// is key `i`, and the score is the dot product (callers pass L2-normalised
/// rows, so it is the cosine similarity). Returns, for each `k` in `ks`, the
/// fraction of queries whose correct key has rank `<= k`, where
/// `rank = 1 + #{keys with a strictly greater score}`.
///
/// **Ties count against the query**: a key scoring exactly as high as the
/// correct one pushes it down (`rank = 1 + #{j ≠ i : score_j ≥ score_i}`),
/// so an encoder that maps every input to one vector ranks every query last
/// instead of first. Scores are accumulated in `f64`. `k = 0` always gives
/// 0. Non-finite inputs are an error.
///
/// Cost is `O(n² · dim)`; eval sets are a few thousand pairs.
pub fn retrieval_topk(queries: &[f32], keys: &[f32], dim: usize, ks: &[usize]) -> Result<Vec<f64>> {
    let ranks = retrieval_ranks(queries, keys, dim)?;
    let n = ranks.len() as f64;
    Ok(ks
        .iter()
        .map(|&kk| ranks.iter().filter(|&&r| r <= kk).count() as f64 / n)
        .collect())
}

/// The pessimistic rank of every query's own key (see [`retrieval_topk`]),
/// from which top-k accuracy over any subset of queries (a bootstrap
/// resample) follows without recomputing scores.
pub fn retrieval_ranks(queries: &[f32], keys: &[f32], dim: usize) -> Result<Vec<usize>> {
    let n = rows(queries, dim, "retrieval queries")?;
    let nk = rows(keys, dim, "retrieval keys")?;
    if n != nk {
        return Err(ModelError::Input(format!(
            "retrieval: {n} queries but {nk} keys (they must be paired)"
        )));
    }
    if n == 0 {
        return Err(ModelError::Input("retrieval: no queries".into()));
    }
    // A NaN score compares false, which would silently rank its query first.
    check_finite(queries, "retrieval queries")?;
    check_finite(keys, "retrieval keys")?;
    let to64 = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
    let (q, k) = (to64(queries), to64(keys));
    Ok(q.chunks_exact(dim)
        .enumerate()
        .map(|(i, qi)| {
            let own = dot(qi, &k[i * dim..(i + 1) * dim]);
            1 + k
                .chunks_exact(dim)
                .enumerate()
                .filter(|&(j, kj)| j != i && dot(qi, kj) >= own)
                .count()
        })
        .collect())
}

/// Hyper-parameters of [`train_probe`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeConfig {
    /// Full-batch Adam steps.
    pub epochs: usize,
    /// Peak Adam step size; it decays to 0 along a cosine over the epochs so
    /// that the last steps settle instead of oscillating.
    pub learning_rate: f64,
    /// L2 penalty `l2/2 · ‖W‖²` added to the *mean* cross-entropy (the bias is
    /// not penalised).
    pub l2: f64,
    /// Seeds the small random initial weights.
    pub seed: u64,
}

impl Default for ProbeConfig {
    /// 200 full-batch Adam steps at lr 0.05 with a cosine decay: on
    /// standardised features this is close to converged for probe-sized data
    /// (thousands of samples × a few hundred dims × ~10 classes) in well
    /// under a second (≈0.7 s for 3000 × 256 × 9 on one core, release). `l2 = 1e-3` is mild regularisation of the order of
    /// scikit-learn's default (`C = 1`, i.e. `1/n` per sample on a mean loss,
    /// for a few thousand samples), enough to keep separable classes from
    /// driving the weights to infinity.
    fn default() -> Self {
        Self {
            epochs: 200,
            learning_rate: 0.05,
            l2: 1e-3,
            seed: 0,
        }
    }
}

/// A trained multinomial logistic-regression probe: standardisation with the
/// training mean/std, then `argmax(W x + b)`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearProbe {
    dim: usize,
    n_classes: usize,
    /// Per-feature training mean.
    mean: Vec<f64>,
    /// Per-feature `1 / std` (1 for constant features).
    inv_std: Vec<f64>,
    /// `[n_classes, dim]`, row-major.
    weights: Vec<f64>,
    /// `[n_classes]`.
    bias: Vec<f64>,
}

impl LinearProbe {
    /// Input width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of classes.
    pub fn n_classes(&self) -> usize {
        self.n_classes
    }

    /// Standardised copy of row-major `x` (`[n, dim]`) in `f64`.
    fn standardise(&self, x: &[f32]) -> Vec<f64> {
        x.chunks_exact(self.dim)
            .flat_map(|row| {
                row.iter()
                    .zip(self.mean.iter().zip(&self.inv_std))
                    .map(|(&v, (&m, &s))| (f64::from(v) - m) * s)
            })
            .collect()
    }

    /// Logits of one standardised row into `out` (`[n_classes]`).
    fn logits(&self, row: &[f64], out: &mut [f64]) {
        for (c, o) in out.iter_mut().enumerate() {
            *o = self.bias[c] + dot(&self.weights[c * self.dim..(c + 1) * self.dim], row);
        }
    }

    /// The predicted class of every row of `x` (`[n, dim]`, row-major). Ties
    /// go to the lowest class index.
    pub fn predict(&self, x: &[f32]) -> Result<Vec<usize>> {
        rows(x, self.dim, "probe input")?;
        check_finite(x, "probe input")?;
        let z = self.standardise(x);
        let mut logits = vec![0.0; self.n_classes];
        Ok(z.chunks_exact(self.dim)
            .map(|row| {
                self.logits(row, &mut logits);
                argmax(&logits)
            })
            .collect())
    }
}

/// Index of the first maximum.
fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

fn check_finite(x: &[f32], what: &str) -> Result<()> {
    match x.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(ModelError::Input(format!(
            "{what}: non-finite value at flat index {i}"
        ))),
        None => Ok(()),
    }
}

/// Trains a linear probe on `x` (`[n, dim]`, row-major) with labels `y` in
/// `0..n_classes`.
///
/// Softmax regression with bias and an L2 penalty on the weights, fitted by
/// full-batch Adam in `f64` on z-scored features (training mean/std; a
/// constant feature gets std 1 so it becomes 0 rather than NaN). Full batch
/// keeps the optimisation deterministic and order-free; the loss is convex,
/// so the seed (small normal initial weights, σ = 0.01) only matters as far
/// as training stops short of the optimum — which is exactly the run-to-run
/// variation [`probe_over_seeds`] reports.
pub fn train_probe(
    x: &[f32],
    dim: usize,
    y: &[usize],
    n_classes: usize,
    cfg: &ProbeConfig,
) -> Result<LinearProbe> {
    let n = rows(x, dim, "probe training features")?;
    if n == 0 {
        return Err(ModelError::Input("probe: no training samples".into()));
    }
    if y.len() != n {
        return Err(ModelError::Input(format!(
            "probe: {n} feature rows but {} labels",
            y.len()
        )));
    }
    if n_classes == 0 {
        return Err(ModelError::Input("probe: n_classes must be > 0".into()));
    }
    if let Some(&bad) = y.iter().find(|&&c| c >= n_classes) {
        return Err(ModelError::Input(format!(
            "probe: label {bad} out of range for {n_classes} classes"
        )));
    }
    if !(cfg.learning_rate.is_finite() && cfg.learning_rate > 0.0) {
        return Err(ModelError::Config(format!(
            "probe: learning_rate must be > 0, got {}",
            cfg.learning_rate
        )));
    }
    if !(cfg.l2.is_finite() && cfg.l2 >= 0.0) {
        return Err(ModelError::Config(format!(
            "probe: l2 must be >= 0, got {}",
            cfg.l2
        )));
    }
    check_finite(x, "probe training features")?;

    // Standardisation statistics (two passes: exact enough and simple).
    let mut mean = vec![0.0f64; dim];
    for row in x.chunks_exact(dim) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += f64::from(v);
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let mut var = vec![0.0f64; dim];
    for row in x.chunks_exact(dim) {
        for ((s, &v), &m) in var.iter_mut().zip(row).zip(&mean) {
            let d = f64::from(v) - m;
            *s += d * d;
        }
    }
    let inv_std: Vec<f64> = var
        .iter()
        .map(|&s| {
            let sd = (s / n as f64).sqrt();
            if sd > 1e-12 { 1.0 / sd } else { 1.0 }
        })
        .collect();

    let mut rng = SplitMix64::new(cfg.seed);
    let weights: Vec<f64> = (0..n_classes * dim)
        .map(|_| 0.01 * rng.next_normal())
        .collect();
    let mut probe = LinearProbe {
        dim,
        n_classes,
        mean,
        inv_std,
        weights,
        bias: vec![0.0; n_classes],
    };
    let z = probe.standardise(x);

    const BETA1: f64 = 0.9;
    const BETA2: f64 = 0.999;
    const EPS: f64 = 1e-8;
    let nw = n_classes * dim;
    // Parameters and their Adam moments as one flat vector: weights, then bias.
    let mut grad = vec![0.0f64; nw + n_classes];
    let mut m1 = vec![0.0f64; nw + n_classes];
    let mut m2 = vec![0.0f64; nw + n_classes];
    let mut p = vec![0.0f64; n_classes];
    let inv_n = 1.0 / n as f64;
    for epoch in 0..cfg.epochs {
        grad.iter_mut().for_each(|g| *g = 0.0);
        for (row, &label) in z.chunks_exact(dim).zip(y) {
            probe.logits(row, &mut p);
            // Softmax in place, shifted by the max for stability.
            let max = p.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            for v in p.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            for (c, &pc) in p.iter().enumerate() {
                // d(mean CE)/d(logit_c) = (p_c - [c == y]) / n.
                let d = (pc / sum - f64::from(u8::from(c == label))) * inv_n;
                for (g, &v) in grad[c * dim..(c + 1) * dim].iter_mut().zip(row) {
                    *g += d * v;
                }
                grad[nw + c] += d;
            }
        }
        for (g, &w) in grad[..nw].iter_mut().zip(&probe.weights) {
            *g += cfg.l2 * w;
        }

        let t = (epoch + 1) as i32;
        let lr = cfg.learning_rate
            * 0.5
            * (1.0 + (std::f64::consts::PI * epoch as f64 / cfg.epochs as f64).cos());
        let step = lr * (1.0 - BETA2.powi(t)).sqrt() / (1.0 - BETA1.powi(t));
        let params = probe.weights.iter_mut().chain(probe.bias.iter_mut());
        for (((w, &g), a), b) in params.zip(&grad).zip(m1.iter_mut()).zip(m2.iter_mut()) {
            *a = BETA1 * *a + (1.0 - BETA1) * g;
            *b = BETA2 * *b + (1.0 - BETA2) * g * g;
            *w -= step * *a / (b.sqrt() + EPS);
        }
    }
    Ok(probe)
}

/// Accuracy and F1 scores of a classification.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassificationScores {
    /// Fraction of samples predicted correctly.
    pub accuracy: f64,
    /// Mean F1 over the classes present in `truth` (see
    /// [`classification_scores`]).
    pub macro_f1: f64,
    /// F1 of each class; `None` for a class neither present nor predicted.
    pub per_class_f1: Vec<Option<f64>>,
    /// Number of true samples of each class.
    pub support: Vec<usize>,
}

/// Accuracy, per-class F1 and macro-F1 of `pred` against `truth` (labels in
/// `0..n_classes`).
///
/// Per class, `F1 = 2·TP / (2·TP + FP + FN)`; a class with no true and no
/// predicted samples has no F1 (`None`). A class that is predicted but never
/// true has F1 0.
///
/// **Macro-F1 averages over the classes that occur in `truth` only** (like
/// scikit-learn's `f1_score(average="macro", labels=<classes present>)`): a
/// class missing from a test split says nothing about the model, and counting
/// its 0 (or skipping it only when also never predicted, as scikit-learn's
/// default does) would make the score depend on which classes the split
/// happened to contain. False positives into an absent class still lower the
/// F1 of the true classes they were taken from.
pub fn classification_scores(
    truth: &[usize],
    pred: &[usize],
    n_classes: usize,
) -> Result<ClassificationScores> {
    if truth.len() != pred.len() {
        return Err(ModelError::Input(format!(
            "scores: {} true labels but {} predictions",
            truth.len(),
            pred.len()
        )));
    }
    if truth.is_empty() {
        return Err(ModelError::Input("scores: no samples".into()));
    }
    if let Some(&bad) = truth.iter().chain(pred).find(|&&c| c >= n_classes) {
        return Err(ModelError::Input(format!(
            "scores: label {bad} out of range for {n_classes} classes"
        )));
    }
    let mut tp = vec![0usize; n_classes];
    let mut predicted = vec![0usize; n_classes];
    let mut support = vec![0usize; n_classes];
    for (&t, &p) in truth.iter().zip(pred) {
        support[t] += 1;
        predicted[p] += 1;
        if t == p {
            tp[t] += 1;
        }
    }
    let correct: usize = tp.iter().sum();
    let per_class_f1: Vec<Option<f64>> = (0..n_classes)
        .map(|c| {
            // 2TP + FP + FN = predicted + support.
            let denom = predicted[c] + support[c];
            (denom > 0).then(|| 2.0 * tp[c] as f64 / denom as f64)
        })
        .collect();
    let present: Vec<f64> = per_class_f1
        .iter()
        .zip(&support)
        .filter(|&(_, &s)| s > 0)
        .map(|(f, _)| f.unwrap_or(0.0))
        .collect();
    Ok(ClassificationScores {
        accuracy: correct as f64 / truth.len() as f64,
        macro_f1: present.iter().sum::<f64>() / present.len() as f64,
        per_class_f1,
        support,
    })
}

/// Linear-probe results over several seeds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeReport {
    /// Number of seeds (probes trained).
    pub seeds: usize,
    pub accuracy_mean: f64,
    /// Population standard deviation over seeds.
    pub accuracy_std: f64,
    pub macro_f1_mean: f64,
    /// Population standard deviation over seeds.
    pub macro_f1_std: f64,
    pub train_samples: usize,
    pub test_samples: usize,
    pub classes: usize,
}

/// Mean and population standard deviation.
fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Trains one probe per seed (`cfg` with its seed replaced) on the training
/// split, scores it on the test split, and reports mean and population std of
/// accuracy and macro-F1, so that a comparison between embeddings can be
/// read against seed-to-seed variation.
///
/// The probe's loss is convex, so with enough epochs (the default) every seed
/// ends at nearly the same optimum and the std is close to 0: it measures
/// optimisation noise only. Variation between data splits is the caller's to
/// measure (call this once per split).
#[allow(clippy::too_many_arguments)]
pub fn probe_over_seeds(
    train_x: &[f32],
    train_y: &[usize],
    test_x: &[f32],
    test_y: &[usize],
    dim: usize,
    n_classes: usize,
    seeds: &[u64],
    cfg: &ProbeConfig,
) -> Result<ProbeReport> {
    if seeds.is_empty() {
        return Err(ModelError::Input("probe: no seeds".into()));
    }
    let n_test = rows(test_x, dim, "probe test features")?;
    if n_test != test_y.len() {
        return Err(ModelError::Input(format!(
            "probe: {n_test} test rows but {} test labels",
            test_y.len()
        )));
    }
    let mut acc = Vec::with_capacity(seeds.len());
    let mut f1 = Vec::with_capacity(seeds.len());
    for &seed in seeds {
        let cfg = ProbeConfig {
            seed,
            ..cfg.clone()
        };
        let probe = train_probe(train_x, dim, train_y, n_classes, &cfg)?;
        let scores = classification_scores(test_y, &probe.predict(test_x)?, n_classes)?;
        acc.push(scores.accuracy);
        f1.push(scores.macro_f1);
    }
    let (accuracy_mean, accuracy_std) = mean_std(&acc);
    let (macro_f1_mean, macro_f1_std) = mean_std(&f1);
    Ok(ProbeReport {
        seeds: seeds.len(),
        accuracy_mean,
        accuracy_std,
        macro_f1_mean,
        macro_f1_std,
        train_samples: train_y.len(),
        test_samples: n_test,
        classes: n_classes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` samples of `k` Gaussian blobs in `dim` dimensions: class means are
    /// `N(0, spread²)` per coordinate (drawn from `means_seed`), noise is
    /// `N(0, 1)` (drawn from `seed`), labels cycle through the classes.
    fn blobs(
        means_seed: u64,
        seed: u64,
        n: usize,
        dim: usize,
        k: usize,
        spread: f64,
    ) -> (Vec<f32>, Vec<usize>) {
        let mut rng = SplitMix64::new(means_seed);
        let means: Vec<f64> = (0..k * dim).map(|_| spread * rng.next_normal()).collect();
        let mut rng = SplitMix64::new(seed);
        let mut x = Vec::with_capacity(n * dim);
        let mut y = Vec::with_capacity(n);
        for i in 0..n {
            let c = i % k;
            y.push(c);
            x.extend((0..dim).map(|j| (means[c * dim + j] + rng.next_normal()) as f32));
        }
        (x, y)
    }

    #[test]
    fn retrieval_topk_hand_example_with_tie() {
        // dim 2, keys: k0 = (1,0), k1 = (0,1), k2 = (0.6,0.8), k3 = (0.6,0.8).
        // Ties count against the query: rank = 1 + #{j != i: score_j >= own}.
        // q0 = (1,0):     scores 1, 0, .6, .6     own 1   -> none >=        -> rank 1
        // q1 = (0.6,0.8): scores .6, .8, 1, 1     own .8  -> k2, k3         -> rank 3
        // q2 = (0.6,0.8): scores .6, .8, 1, 1     own 1   -> k3 ties        -> rank 2
        // q3 = (1,0):     scores 1, 0, .6, .6     own .6  -> k0, k2 (a tie) -> rank 3
        // top1 = 1/4, top2 = 2/4, top3 = 4/4; k = 0 -> 0; k = 10 -> 1.
        let keys = [1.0, 0.0, 0.0, 1.0, 0.6, 0.8, 0.6, 0.8];
        let queries = [1.0, 0.0, 0.6, 0.8, 0.6, 0.8, 1.0, 0.0];
        assert_eq!(
            retrieval_ranks(&queries, &keys, 2).unwrap(),
            vec![1, 3, 2, 3]
        );
        let r = retrieval_topk(&queries, &keys, 2, &[0, 1, 2, 3, 10]).unwrap();
        assert_eq!(r, vec![0.0, 0.25, 0.5, 1.0, 1.0]);
        // One vector for everything: every query ties with all 3 keys and
        // ranks last, so an encoder that collapses scores 0 at top-1.
        let r = retrieval_topk(&[1.0; 6], &[0.5; 6], 2, &[1, 2, 3]).unwrap();
        assert_eq!(r, vec![0.0, 0.0, 1.0]);
    }

    #[test]
    fn retrieval_shape_errors() {
        assert!(retrieval_topk(&[], &[], 2, &[1]).is_err()); // n = 0
        assert!(retrieval_topk(&[1.0; 4], &[1.0; 6], 2, &[1]).is_err()); // 2 vs 3
        assert!(retrieval_topk(&[1.0; 5], &[1.0; 5], 2, &[1]).is_err()); // ragged
        assert!(retrieval_topk(&[1.0; 4], &[1.0; 4], 0, &[1]).is_err()); // dim 0
        assert!(retrieval_topk(&[f32::NAN, 0.0], &[1.0, 0.0], 2, &[1]).is_err());
    }

    #[test]
    fn classification_scores_hand_example() {
        // truth [0,0,1,1,2], pred [0,1,1,1,0], 4 classes.
        // accuracy: positions 0, 2, 3 correct -> 3/5 = 0.6.
        // class 0: TP 1 (pos 0), FP 1 (pos 4), FN 1 (pos 1) -> 2/(2+1+1) = 0.5
        // class 1: TP 2 (pos 2,3), FP 1 (pos 1), FN 0     -> 4/(4+1)   = 0.8
        // class 2: TP 0, FP 0, FN 1 (pos 4)                -> 0
        // class 3: absent and never predicted              -> None
        // macro-F1 over present classes {0,1,2}: (0.5 + 0.8 + 0) / 3 = 0.4333...
        let s = classification_scores(&[0, 0, 1, 1, 2], &[0, 1, 1, 1, 0], 4).unwrap();
        assert!((s.accuracy - 0.6).abs() < 1e-12);
        assert!((s.macro_f1 - 1.3 / 3.0).abs() < 1e-12);
        assert_eq!(s.support, vec![2, 2, 1, 0]);
        assert_eq!(s.per_class_f1.len(), 4);
        assert!((s.per_class_f1[0].unwrap() - 0.5).abs() < 1e-12);
        assert!((s.per_class_f1[1].unwrap() - 0.8).abs() < 1e-12);
        assert_eq!(s.per_class_f1[2], Some(0.0));
        assert_eq!(s.per_class_f1[3], None);

        // A class predicted but absent from truth: F1 Some(0), not in the macro.
        // truth [0,0], pred [0,1]: class 0 F1 = 2/(2+0+1) = 2/3; class 1 = 0.
        let s = classification_scores(&[0, 0], &[0, 1], 2).unwrap();
        assert_eq!(s.per_class_f1[1], Some(0.0));
        assert!((s.macro_f1 - 2.0 / 3.0).abs() < 1e-12);
        assert!((s.accuracy - 0.5).abs() < 1e-12);
    }

    #[test]
    fn classification_scores_errors() {
        assert!(classification_scores(&[], &[], 3).is_err());
        assert!(classification_scores(&[0, 1], &[0], 3).is_err());
        assert!(classification_scores(&[0, 3], &[0, 1], 3).is_err());
        assert!(classification_scores(&[0, 1], &[0, 5], 3).is_err());
    }

    #[test]
    fn probe_separates_gaussian_blobs() {
        // Probe-sized: 3000 train × 256 dims × 9 classes, the default config.
        let (dim, k) = (256, 9);
        let (train_x, train_y) = blobs(1, 2, 3000, dim, k, 0.25);
        let (test_x, test_y) = blobs(1, 3, 1000, dim, k, 0.25);
        let start = std::time::Instant::now();
        let probe = train_probe(&train_x, dim, &train_y, k, &ProbeConfig::default()).unwrap();
        let elapsed = start.elapsed();
        eprintln!("train_probe 3000x256x9, default config: {elapsed:?}");
        let s = classification_scores(&test_y, &probe.predict(&test_x).unwrap(), k).unwrap();
        eprintln!(
            "blob test accuracy {:.4}, macro-F1 {:.4}",
            s.accuracy, s.macro_f1
        );
        assert!(s.accuracy >= 0.95, "accuracy {}", s.accuracy);
        assert!(s.macro_f1 >= 0.95, "macro-F1 {}", s.macro_f1);
    }

    #[test]
    fn probe_is_near_chance_on_random_labels() {
        // Labels independent of the features: nothing to learn, so held-out
        // accuracy must stay at chance (0.25) even though the probe can fit
        // some of the training noise. 2000 test samples: chance ± 0.05 is
        // about 5 standard deviations.
        let (dim, k, n) = (32, 4, 2000);
        let mut rng = SplitMix64::new(11);
        let mut sample = |n: usize| -> (Vec<f32>, Vec<usize>) {
            let x = (0..n * dim).map(|_| rng.next_normal() as f32).collect();
            let y = (0..n).map(|_| rng.next_below(k as u64) as usize).collect();
            (x, y)
        };
        let (train_x, train_y) = sample(n);
        let (test_x, test_y) = sample(n);
        let probe = train_probe(&train_x, dim, &train_y, k, &ProbeConfig::default()).unwrap();
        let s = classification_scores(&test_y, &probe.predict(&test_x).unwrap(), k).unwrap();
        eprintln!("random-label test accuracy {:.4}", s.accuracy);
        assert!((s.accuracy - 0.25).abs() < 0.05, "accuracy {}", s.accuracy);
    }

    #[test]
    fn probe_is_deterministic_per_seed_and_seed_matters() {
        let (dim, k) = (16, 3);
        let (x, y) = blobs(5, 6, 300, dim, k, 0.3);
        let cfg = ProbeConfig {
            epochs: 20,
            seed: 42,
            ..ProbeConfig::default()
        };
        let a = train_probe(&x, dim, &y, k, &cfg).unwrap();
        let b = train_probe(&x, dim, &y, k, &cfg).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.predict(&x).unwrap(), b.predict(&x).unwrap());
        let c = train_probe(&x, dim, &y, k, &ProbeConfig { seed: 43, ..cfg }).unwrap();
        assert_ne!(a.weights, c.weights);
    }

    #[test]
    fn probe_handles_constant_features() {
        // Feature 1 is constant (std 0 -> 1, standardised to 0); feature 0
        // alone decides the class.
        let x = [-2.0, 5.0, -1.0, 5.0, 1.0, 5.0, 2.0, 5.0];
        let y = [0, 0, 1, 1];
        let probe = train_probe(&x, 2, &y, 2, &ProbeConfig::default()).unwrap();
        assert!(probe.weights.iter().all(|w| w.is_finite()));
        assert_eq!(probe.predict(&x).unwrap(), vec![0, 0, 1, 1]);
        assert_eq!(probe.predict(&[-3.0, 5.0, 3.0, 7.0]).unwrap(), vec![0, 1]);
    }

    #[test]
    fn probe_shape_errors() {
        let cfg = ProbeConfig::default();
        let x = [0.0f32; 6];
        assert!(train_probe(&x, 4, &[0], 2, &cfg).is_err()); // ragged
        assert!(train_probe(&x, 2, &[0, 1], 2, &cfg).is_err()); // 3 rows, 2 labels
        assert!(train_probe(&x, 2, &[0, 1, 2], 2, &cfg).is_err()); // label out of range
        assert!(train_probe(&x, 0, &[], 2, &cfg).is_err()); // dim 0
        assert!(train_probe(&[], 2, &[], 2, &cfg).is_err()); // no samples
        assert!(train_probe(&x, 2, &[0, 0, 0], 0, &cfg).is_err()); // no classes
        assert!(train_probe(&[f32::NAN, 0.0], 2, &[0], 1, &cfg).is_err()); // NaN
        let probe = train_probe(&x, 2, &[0, 1, 1], 2, &cfg).unwrap();
        assert_eq!(probe.dim(), 2);
        assert_eq!(probe.n_classes(), 2);
        assert!(probe.predict(&[0.0; 3]).is_err()); // ragged
        assert_eq!(probe.predict(&[]).unwrap(), Vec::<usize>::new());
    }

    #[test]
    fn probe_over_seeds_reports_mean_and_std() {
        let (dim, k) = (16, 3);
        let (train_x, train_y) = blobs(7, 8, 300, dim, k, 0.6);
        let (test_x, test_y) = blobs(7, 9, 150, dim, k, 0.6);
        let cfg = ProbeConfig::default();
        let seeds = [1, 2, 3];
        let r =
            probe_over_seeds(&train_x, &train_y, &test_x, &test_y, dim, k, &seeds, &cfg).unwrap();
        assert_eq!(r.seeds, 3);
        assert_eq!((r.train_samples, r.test_samples, r.classes), (300, 150, 3));
        assert!(r.accuracy_mean > 0.9, "{r:?}");
        assert!(r.accuracy_std >= 0.0 && r.macro_f1_std >= 0.0);

        // Mean and population std agree with the single-seed runs.
        let accs: Vec<f64> = seeds
            .iter()
            .map(|&seed| {
                let p = train_probe(
                    &train_x,
                    dim,
                    &train_y,
                    k,
                    &ProbeConfig {
                        seed,
                        ..cfg.clone()
                    },
                )
                .unwrap();
                classification_scores(&test_y, &p.predict(&test_x).unwrap(), k)
                    .unwrap()
                    .accuracy
            })
            .collect();
        let (m, s) = mean_std(&accs);
        assert_eq!((r.accuracy_mean, r.accuracy_std), (m, s));
        assert_eq!(mean_std(&[1.0, 3.0]), (2.0, 1.0));

        assert!(probe_over_seeds(&train_x, &train_y, &test_x, &test_y, dim, k, &[], &cfg).is_err());
        assert!(
            probe_over_seeds(
                &train_x,
                &train_y,
                &test_x,
                &test_y[1..],
                dim,
                k,
                &seeds,
                &cfg
            )
            .is_err()
        );
    }
}
