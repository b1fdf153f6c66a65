//! Each input-only-gradient op (src/ops.rs) against the same function written with candle's
//! composed ops (which have a full backward): equal outputs and equal input gradients.
use candle_core::{Device, Tensor, Var, D};
use lorafit::ops;
use lorafit::rng::SeededRng;

fn rand(rng: &mut SeededRng, shape: &[usize]) -> Tensor {
    rng.normal(shape, 1.0, &Device::Cpu).unwrap()
}

/// max |a - b| over all elements.
fn diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Checks f(x) == g(x) and d/dx sum(f(x) * r) == d/dx sum(g(x) * r) for a random r.
fn check(name: &str, x: Tensor, fast: impl Fn(&Tensor) -> Tensor, slow: impl Fn(&Tensor) -> Tensor) {
    let mut rng = SeededRng::new(99);
    let xv = Var::from_tensor(&x).unwrap();
    let (yf, ys) = (fast(xv.as_tensor()), slow(xv.as_tensor()));
    assert!(diff(&yf, &ys) < 1e-5, "{name}: forward differs by {}", diff(&yf, &ys));
    let r = rand(&mut rng, yf.dims());
    let gf = (&yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = (&ys * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let (gf, gs) = (gf.get(xv.as_tensor()).expect("fast op gave no gradient"), gs.get(xv.as_tensor()).unwrap());
    assert!(diff(gf, gs) < 1e-4, "{name}: input gradient differs by {}", diff(gf, gs));
    assert!(gf.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "{name}: zero gradient");
}

#[test]
fn frozen_linear_matches_matmul() {
    let mut rng = SeededRng::new(1);
    let (w, b) = (rand(&mut rng, &[6, 5]), rand(&mut rng, &[5]));
    check(
        "frozen_linear",
        rand(&mut rng, &[2, 3, 6]),
        |x| ops::frozen_linear(x, &w, Some(&b)).unwrap(),
        |x| x.broadcast_matmul(&w).unwrap().broadcast_add(&b).unwrap(),
    );
    // A transposed (nn.Linear-layout) weight view works too.
    let wt = rand(&mut rng, &[5, 6]);
    check("frozen_linear (transposed)", rand(&mut rng, &[4, 6]), |x| ops::frozen_linear(x, &wt.t().unwrap(), None).unwrap(), |x| {
        x.matmul(&wt.t().unwrap()).unwrap()
    });
}

#[test]
fn layer_norm_matches_composed() {
    let mut rng = SeededRng::new(2);
    let (g, b) = (rand(&mut rng, &[8]), rand(&mut rng, &[8]));
    check("layer_norm", rand(&mut rng, &[2, 3, 8]), |x| ops::layer_norm(x, &g, &b, 1e-5).unwrap(), |x| {
        let mu = x.mean_keepdim(D::Minus1).unwrap();
        let xc = x.broadcast_sub(&mu).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        xc.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(&g).unwrap().broadcast_add(&b).unwrap()
    });
}

#[test]
fn rms_norm_matches_composed() {
    let mut rng = SeededRng::new(3);
    let g = rand(&mut rng, &[8]);
    check("rms_norm", rand(&mut rng, &[2, 3, 8]), |x| ops::rms_norm(x, &g, 1e-6).unwrap(), |x| {
        let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        x.broadcast_div(&(ms + 1e-6).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(&g).unwrap()
    });
}

#[test]
fn masked_softmax_matches_composed() {
    let mut rng = SeededRng::new(4);
    let mask = lorafit::model::causal_mask(&[vec![false, true, true, true], vec![true; 4]], 4, 0, &Device::Cpu).unwrap();
    check("masked_softmax", rand(&mut rng, &[2, 3, 4, 4]), |s| ops::masked_softmax(s, &mask).unwrap(), |s| {
        candle_nn::ops::softmax(&s.broadcast_add(&mask).unwrap(), D::Minus1).unwrap()
    });
}

#[test]
fn rope_matches_composed() {
    let mut rng = SeededRng::new(5);
    let (cos, sin) = (rand(&mut rng, &[2, 5, 4]), rand(&mut rng, &[2, 5, 4]));
    check("rope", rand(&mut rng, &[2, 3, 5, 8]), |x| ops::rope(x, &cos, &sin).unwrap(), |x| {
        // HF: x * cos + rotate_half(x) * sin, with cos/sin repeated over both halves.
        let c = Tensor::cat(&[&cos, &cos], D::Minus1).unwrap().unsqueeze(1).unwrap();
        let s = Tensor::cat(&[&sin, &sin], D::Minus1).unwrap().unsqueeze(1).unwrap();
        let (x1, x2) = (x.narrow(D::Minus1, 0, 4).unwrap(), x.narrow(D::Minus1, 4, 4).unwrap());
        let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
        (x.broadcast_mul(&c).unwrap() + rot.broadcast_mul(&s).unwrap()).unwrap()
    });
}

#[test]
fn cross_entropy_matches_log_softmax() {
    let mut rng = SeededRng::new(6);
    let t = Tensor::new(&[3u32, 0, 9, 5], &Device::Cpu).unwrap();
    let t2 = t.unsqueeze(1).unwrap();
    check("cross_entropy", rand(&mut rng, &[4, 10]), |z| ops::cross_entropy(z, &t).unwrap(), |z| {
        candle_nn::ops::log_softmax(z, D::Minus1).unwrap().gather(&t2, D::Minus1).unwrap().squeeze(1).unwrap().neg().unwrap()
    });
}

#[test]
fn fused_lm_head_cross_entropy_matches_unfused() {
    let mut rng = SeededRng::new(7);
    let w = rand(&mut rng, &[6, 11]); // (C, V)
    let t = Tensor::new(&[3u32, 0, 10, 5, 7], &Device::Cpu).unwrap();
    // chunk 2 over 5 rows: uneven chunks.
    check("lm_head_cross_entropy", rand(&mut rng, &[5, 6]), |h| ops::lm_head_cross_entropy(h, &w, &t, 2).unwrap(), |h| {
        let z = h.matmul(&w).unwrap();
        candle_nn::ops::log_softmax(&z, D::Minus1).unwrap().gather(&t.unsqueeze(1).unwrap(), D::Minus1).unwrap().squeeze(1).unwrap().neg().unwrap()
    });
}

#[test]
fn gelu_and_silu_match_composed() {
    let mut rng = SeededRng::new(7);
    let x = (rand(&mut rng, &[3, 5, 40]) * 3.0).unwrap(); // tails where tanh saturates too
    check("gelu", x.clone(), |x| ops::act::gelu(x).unwrap(), |x| {
        // HF NewGELUActivation, composed: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        let inner = ((x + (x.powf(3.0).unwrap() * 0.044715).unwrap()).unwrap() * (2.0 / std::f64::consts::PI).sqrt()).unwrap();
        ((x * 0.5).unwrap() * (inner.tanh().unwrap() + 1.0).unwrap()).unwrap()
    });
    check("silu", x, |x| ops::act::silu(x).unwrap(), |x| (x / (x.neg().unwrap().exp().unwrap() + 1.0).unwrap()).unwrap());
}

#[test]
fn packed_attention_matches_composed() {
    let mut rng = SeededRng::new(8);
    let (b, t, h, d) = (2, 5, 3, 4);
    // Row 1 is left-padded by two positions.
    let valid = vec![vec![true; t], vec![false, false, true, true, true]];
    let mask = lorafit::model::causal_mask(&valid, t, 0, &Device::Cpu).unwrap();
    let scale = 1.0 / (d as f64).sqrt();
    check("packed_self_attention", rand(&mut rng, &[b, t, 3 * h * d]), |qkv| ops::attention::packed_self_attention(qkv, h, &mask, scale).unwrap(), |qkv| {
        let c = h * d;
        let split = |i: usize| qkv.narrow(D::Minus1, i * c, c).unwrap().reshape((b, t, h, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        let (q, k, v) = (split(0), split(1), split(2));
        let s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap().broadcast_add(&mask).unwrap();
        let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
        p.matmul(&v).unwrap().transpose(1, 2).unwrap().reshape((b, t, c)).unwrap()
    });
}

/// The fused LoRA node (a LayerNorm `pre` op, one frozen linear, a frozen adapter and a
/// trainable one, both with dropout) against the same written with candle's ops: output and
/// the gradients of x, A, B.
#[test]
fn fused_lora_linear_matches_composed() {
    use lorafit::ops::linear::{lora_linear, FrozenWeight, Term};
    use std::sync::Arc;
    let mut rng = SeededRng::new(9);
    let (n, i, o, r) = (6, 10, 7, 3);
    let (w, bias) = (rand(&mut rng, &[i, o]), rand(&mut rng, &[o]));
    let x = Var::from_tensor(&rand(&mut rng, &[2, n / 2, i])).unwrap();
    let (a, bm) = (Var::from_tensor(&rand(&mut rng, &[r, i])).unwrap(), Var::from_tensor(&rand(&mut rng, &[o, r])).unwrap());
    let (a2, b2) = (rand(&mut rng, &[r, i]), rand(&mut rng, &[o, r]));
    let keep = 1.0f32 / (1.0 - 0.3);
    let m1 = rng.dropout_keep(&[2, n / 2, i], 0.3, &Device::Cpu).unwrap();
    let m2 = rng.dropout_keep(&[2, n / 2, i], 0.3, &Device::Cpu).unwrap();
    let terms = vec![
        Term { a: a2.clone(), b: b2.clone(), scale: 0.5, dropout: Some((m2.clone(), keep)) },
        Term { a: a.as_tensor().detach(), b: bm.as_tensor().detach(), scale: 2.0, dropout: Some((m1.clone(), keep)) },
    ];
    let wf: FrozenWeight = { let w = w.clone(); Arc::new(move |_| Ok(w.clone())) };
    // With a LayerNorm as the node's `pre` op (as GPT-2's ln_1 before c_attn).
    let (g, beta) = (rand(&mut rng, &[i]), rand(&mut rng, &[i]));
    let pre = ops::layer_norm_pre(&g, &beta, 1e-5).unwrap();
    let fast = lora_linear(x.as_tensor(), Some(pre), wf, Some(bias.clone()), terms, Some((1, a.as_tensor().clone(), bm.as_tensor().clone()))).unwrap();
    let xn = {
        let x = x.as_tensor();
        let mu = x.mean_keepdim(D::Minus1).unwrap();
        let xc = x.broadcast_sub(&mu).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        xc.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(&g).unwrap().broadcast_add(&beta).unwrap()
    };
    let drop = |m: &Tensor| (&xn * (m.to_dtype(candle_core::DType::F32).unwrap() * keep as f64).unwrap()).unwrap();
    let delta = |u: Tensor, a: &Tensor, b: &Tensor, s: f64| (u.broadcast_matmul(&a.t().unwrap()).unwrap().broadcast_matmul(&b.t().unwrap()).unwrap() * s).unwrap();
    let slow = (xn.broadcast_matmul(&w).unwrap().broadcast_add(&bias).unwrap() + delta(drop(&m2), &a2, &b2, 0.5)).unwrap();
    let slow = (slow + delta(drop(&m1), a.as_tensor(), bm.as_tensor(), 2.0)).unwrap();
    assert!(diff(&fast, &slow) < 1e-4, "forward differs by {}", diff(&fast, &slow));
    let rr = rand(&mut rng, fast.dims());
    let gf = (&fast * &rr).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = (&slow * &rr).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in [("x", &x), ("A", &a), ("B", &bm)] {
        let (f, s) = (gf.get(v.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}")), gs.get(v.as_tensor()).unwrap());
        assert!(diff(f, s) < 1e-3, "gradient of {name} differs by {}", diff(f, s));
        assert!(f.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "{name}: zero gradient");
    }
}

/// LLaMA's attention node with grouped-query heads (4 query heads on 2 kv heads) against the
/// composed form with k and v repeated per query head: output and the gradients of q, k and v.
#[test]
fn gqa_self_attention_matches_composed() {
    let mut rng = SeededRng::new(10);
    let (b, t, h, h_kv, d) = (2, 5, 4, 2, 3);
    let valid = vec![vec![true; t], vec![false, true, true, true, true]];
    let mask = lorafit::model::causal_mask(&valid, t, 0, &Device::Cpu).unwrap();
    let scale = 1.0 / (d as f64).sqrt();
    let q = Var::from_tensor(&rand(&mut rng, &[b, h, t, d])).unwrap();
    let k = Var::from_tensor(&rand(&mut rng, &[b, h_kv, t, d])).unwrap();
    let v = Var::from_tensor(&rand(&mut rng, &[b, h_kv, t, d])).unwrap();
    let fast = ops::attention::self_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, scale).unwrap();
    // Query head i uses kv head i / (h / h_kv), as transformers' repeat_kv.
    let rep = |x: &Tensor| x.unsqueeze(2).unwrap().repeat((1, 1, h / h_kv, 1, 1)).unwrap().reshape((b, h, t, d)).unwrap();
    let s = (q.as_tensor().matmul(&rep(k.as_tensor()).t().unwrap()).unwrap() * scale).unwrap().broadcast_add(&mask).unwrap();
    let slow = candle_nn::ops::softmax(&s, D::Minus1).unwrap().matmul(&rep(v.as_tensor())).unwrap();
    let slow = slow.transpose(1, 2).unwrap().reshape((b, t, h * d)).unwrap();
    assert!(diff(&fast, &slow) < 1e-5, "forward differs by {}", diff(&fast, &slow));
    let r = rand(&mut rng, fast.dims());
    let gf = (&fast * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = (&slow * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
        let (f, s) = (gf.get(x.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}")), gs.get(x.as_tensor()).unwrap());
        assert!(diff(f, s) < 1e-4, "gradient of {name} differs by {}", diff(f, s));
    }
}

/// One-row products (batch-1 decoding) take a hand-written path (`ops/gemv.rs`): equal to
/// candle's matmul for both weight layouts, odd sizes included.
#[test]
fn one_row_matmul_matches_gemm() {
    let mut rng = SeededRng::new(11);
    for (k, n) in [(70, 33), (768, 5), (3, 1000), (96, 2304)] {
        let x = rand(&mut rng, &[1, 1, k]);
        let w = rand(&mut rng, &[k, n]);
        let wt = rand(&mut rng, &[n, k]);
        for (name, w) in [("(k, n)", w), ("(n, k) transposed", wt.t().unwrap())] {
            let fast = ops::matmul_rows(&x, &w).unwrap();
            let slow = x.reshape((1, k)).unwrap().matmul(&w).unwrap().reshape((1, 1, n)).unwrap();
            let scale = slow.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            let d = diff(&fast, &slow);
            assert!(d <= 1e-5 * scale.max(1.0), "{k}x{n} {name}: differs by {d}");
        }
    }
}
