//! The one-pass CPU kernels of `ops::fused_cpu` against the tensor-op formulas they replace
//! (the generic twins, which CUDA runs), bit for bit: dropout, `y += s a b` (contiguous and
//! transposed operands), `y += d ⊙ m keep`, and the LayerNorm / RMSNorm backwards.
use candle_core::{DType, Device, Tensor, D};
use lorafit::ops::fused_cpu::{add_dropped, add_matmul, drop_mul, norm_backward, usable, Norm};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn mask(shape: &[usize], seed: u64) -> Tensor {
    randn(shape, seed).ge(-1.6).unwrap().to_dtype(DType::U8).unwrap() // ~90% kept
}

/// 0 when a and b hold the same bits; else the largest difference relative to b's scale.
fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    assert_eq!(a.len(), b.len());
    if a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()) {
        return 0.0;
    }
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(f32::MIN_POSITIVE, f32::max) / scale
}

#[test]
fn kernels_equal_the_tensor_formulas() {
    if !usable(&[&randn(&[1], 0)]) {
        return; // LORAFIT_GENERIC_OPS=1: the kernels are off and the formulas run instead
    }
    let x = randn(&[3, 50, 96], 1);
    let m = mask(&[3, 50, 96], 2);
    let keep = 1.0 / 0.9f32;
    let want = (&x * (m.to_dtype(DType::F32).unwrap() * keep as f64).unwrap()).unwrap();
    assert_eq!(max_rel(&drop_mul(&x, &m, keep).unwrap(), &want), 0.0, "drop_mul");

    let y = randn(&[3, 50, 96], 3);
    let d = randn(&[3, 50, 96], 4);
    let want = (&y + (&d * (m.to_dtype(DType::F32).unwrap() * keep as f64).unwrap()).unwrap()).unwrap();
    let got = add_dropped(y.copy().unwrap(), &d, &m, keep).unwrap();
    assert_eq!(max_rel(&got, &want), 0.0, "add_dropped");

    // y (150, 96) += s · a (150, 8) @ b (8, 96), b contiguous and as a transposed (96, 8) view.
    let a = randn(&[3, 50, 8], 5);
    let b = randn(&[8, 96], 6);
    let bt = randn(&[96, 8], 7);
    for (name, b) in [("contiguous", b), ("transposed", bt.t().unwrap())] {
        let want = (&y + (a.reshape((150, 8)).unwrap().matmul(&b).unwrap().reshape((3, 50, 96)).unwrap() * 0.3).unwrap()).unwrap();
        let got = add_matmul(y.copy().unwrap(), &a, &b, 0.3).unwrap();
        assert_eq!(max_rel(&got, &want), 0.0, "add_matmul {name}: not bit-identical");
    }
    // The original y is untouched: add_matmul wrote into its own copy.
    assert_eq!(max_rel(&y, &randn(&[3, 50, 96], 3)), 0.0);
}

#[test]
fn norm_backwards_equal_the_composed_formulas() {
    if !usable(&[&randn(&[1], 0)]) {
        return;
    }
    let x = (randn(&[2, 40, 768], 11) + 0.3).unwrap();
    let g = randn(&[2, 40, 768], 12);
    let gamma = (randn(&[768], 13) * 0.5).unwrap();
    let eps = 1e-5;
    // LayerNorm: (ĝ - mean(ĝ) - x̂ mean(ĝ x̂)) σ⁻¹
    let mu = x.mean_keepdim(D::Minus1).unwrap();
    let xc = x.broadcast_sub(&mu).unwrap();
    let rstd = (xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps).unwrap().sqrt().unwrap().recip().unwrap();
    let xhat = xc.broadcast_mul(&rstd).unwrap();
    let gh = g.broadcast_mul(&gamma).unwrap();
    let m1 = gh.mean_keepdim(D::Minus1).unwrap();
    let m2 = (&gh * &xhat).unwrap().mean_keepdim(D::Minus1).unwrap();
    let want = gh.broadcast_sub(&m1).unwrap().sub(&xhat.broadcast_mul(&m2).unwrap()).unwrap().broadcast_mul(&rstd).unwrap();
    let got = norm_backward(Norm::Layer, &x, &g, &gamma, eps).unwrap();
    assert_eq!(max_rel(&got, &want), 0.0, "layer norm: not bit-identical");
    // RMSNorm: r ĝ - x r³ mean(ĝ x)
    let r = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps).unwrap().sqrt().unwrap().recip().unwrap();
    let m = (&gh * &x).unwrap().mean_keepdim(D::Minus1).unwrap();
    let want = gh.broadcast_mul(&r).unwrap().sub(&x.broadcast_mul(&(r.powf(3.0).unwrap() * m).unwrap()).unwrap()).unwrap();
    let got = norm_backward(Norm::Rms, &x, &g, &gamma, eps).unwrap();
    assert_eq!(max_rel(&got, &want), 0.0, "rms norm: not bit-identical");
}

/// The LM head's softmax cross-entropy: the fused rows against the tensor ops of
/// `lm_head_cross_entropy_capped`'s generic path, bit for bit, with and without a logit scale.
#[test]
fn softmax_xent_equals_the_tensor_ops() {
    use lorafit::ops::fused_cpu::softmax_xent;
    if !usable(&[&randn(&[1], 0)]) {
        return;
    }
    let z = (randn(&[7, 1000], 21) * 3.0).unwrap();
    let t = Tensor::new(&[0u32, 999, 5, 500, 17, 3, 998], &Device::Cpu).unwrap();
    for scale in [1.0, 1.0 / 0.7] {
        let zs = if scale != 1.0 { (&z * scale).unwrap() } else { z.clone() };
        let t1 = t.unsqueeze(1).unwrap();
        let max = zs.max_keepdim(D::Minus1).unwrap();
        let e = zs.broadcast_sub(&max).unwrap().exp().unwrap();
        let sum = e.sum_keepdim(D::Minus1).unwrap();
        let lse = (sum.log().unwrap() + &max).unwrap();
        let want_nll = (lse - zs.gather(&t1, D::Minus1).unwrap()).unwrap().squeeze(1).unwrap();
        let mut p = e.broadcast_div(&sum).unwrap();
        p = p.scatter_add(&t1, &t1.ones_like().unwrap().to_dtype(DType::F32).unwrap().neg().unwrap(), D::Minus1).unwrap();
        if scale != 1.0 {
            p = (p * scale).unwrap();
        }
        let (nll, got_p) = softmax_xent(&z, &t, scale, true).unwrap();
        assert_eq!(max_rel(&nll, &want_nll), 0.0, "nll, scale {scale}");
        assert_eq!(max_rel(&got_p.unwrap(), &p), 0.0, "softmax - onehot, scale {scale}");
        let (nll2, none) = softmax_xent(&z, &t, scale, false).unwrap();
        assert!(none.is_none());
        assert_eq!(max_rel(&nll2, &want_nll), 0.0, "nll without the gradient");
    }
    assert!(softmax_xent(&z, &Tensor::new(&[0u32, 1, 2, 3, 4, 5, 1000], &Device::Cpu).unwrap(), 1.0, true).is_err());
}

/// Attention's softmax forward (scale, additive mask, softmax) and backward, against the tensor
/// ops of `ops::attention`'s generic path, bit for bit; a mask per batch row and a shared one.
#[test]
fn attention_softmax_kernels_equal_the_tensor_ops() {
    use lorafit::ops::fused_cpu::{scaled_masked_softmax_, softmax_backward_};
    if !usable(&[&randn(&[1], 0)]) {
        return;
    }
    let (b, h, t) = (2, 3, 9);
    let raw = randn(&[b, h, t, t], 31);
    let causal: Vec<f32> = (0..t * t).map(|k| if k % t > k / t { -1e9 } else { 0.0 }).collect();
    let shared = Tensor::from_vec(causal.clone(), (1, 1, t, t), &Device::Cpu).unwrap();
    let mut per_row = causal.clone();
    per_row.extend(causal.iter().enumerate().map(|(k, &m)| if k % t == 0 { -1e9 } else { m })); // row 2 pads position 0
    let per_row = Tensor::from_vec(per_row, (2, 1, t, t), &Device::Cpu).unwrap();
    let scale = 0.125f64.sqrt();
    for mask in [&shared, &per_row] {
        let want = candle_nn::ops::softmax_last_dim(&(&raw * scale).unwrap().broadcast_add(mask).unwrap()).unwrap();
        let p = scaled_masked_softmax_(raw.copy().unwrap(), mask, scale).unwrap();
        assert_eq!(max_rel(&p, &want), 0.0, "softmax forward");
        let dp = randn(&[b, h, t, t], 32);
        let dot = (&dp * &p).unwrap().sum_keepdim(D::Minus1).unwrap();
        let want = ((&p * dp.broadcast_sub(&dot).unwrap()).unwrap() * scale).unwrap();
        assert_eq!(max_rel(&softmax_backward_(dp.copy().unwrap(), &p, scale).unwrap(), &want), 0.0, "softmax backward");
    }
}

/// The kernels skip expf's underflow path for masked scores: the same bits as expf everywhere.
#[test]
fn expf_underflows_to_plus_zero_below_minus_104() {
    let mut x = -104.0f32;
    while x > -200.0 {
        assert_eq!(x.exp().to_bits(), 0f32.to_bits(), "exp({x})");
        x = f32::from_bits(x.to_bits() + 1); // the next f32 below
        if x < -104.01 {
            x *= 1.01;
        }
    }
    assert_eq!((-1e9f32).exp().to_bits(), 0);
    assert_eq!(f32::NEG_INFINITY.exp().to_bits(), 0);
    assert!((-103.9f32).exp() > 0.0);
}

#[test]
fn transpose2_is_the_transpose() {
    use lorafit::ops::fused_cpu::transpose2;
    for (r, c) in [(1, 1), (3, 70), (65, 33), (768, 96)] {
        let w = randn(&[r, c], (r * c) as u64);
        let t = transpose2(&w).unwrap();
        assert_eq!(t.dims(), [c, r]);
        assert_eq!(max_rel(&t, &w.t().unwrap().contiguous().unwrap()), 0.0, "{r}x{c}");
    }
}
