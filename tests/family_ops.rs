//! The ops the model families added (`ops/family.rs`, partial rope, soft-capped attention and
//! LM head + loss, the sliding-window mask) against the same functions written with candle's
//! composed ops (which have a full backward): equal outputs and equal input gradients.
use candle_core::{Device, Tensor, Var, D};
use lorafit::ops;
use lorafit::rng::SeededRng;

fn rand(rng: &mut SeededRng, shape: &[usize], std: f32) -> Tensor {
    rng.normal(shape, std, &Device::Cpu).unwrap()
}

fn diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// f(x) == g(x), and the gradients of sum(f(x) * r) and sum(g(x) * r) w.r.t. x agree.
fn check(name: &str, x: Tensor, fast: impl Fn(&Tensor) -> Tensor, slow: impl Fn(&Tensor) -> Tensor) {
    let mut rng = SeededRng::new(99);
    let xv = Var::from_tensor(&x).unwrap();
    let (yf, ys) = (fast(xv.as_tensor()), slow(xv.as_tensor()));
    assert!(diff(&yf, &ys) < 1e-5, "{name}: forward differs by {}", diff(&yf, &ys));
    let r = rand(&mut rng, yf.dims(), 1.0);
    let gf = (&yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = (&ys * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let (gf, gs) = (gf.get(xv.as_tensor()).expect("fast op gave no gradient"), gs.get(xv.as_tensor()).unwrap());
    assert!(diff(gf, gs) < 1e-4, "{name}: input gradient differs by {}", diff(gf, gs));
    assert!(gf.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0, "{name}: zero gradient");
}

fn softcap_composed(x: &Tensor, c: f64) -> Tensor {
    ((x / c).unwrap().tanh().unwrap() * c).unwrap()
}

#[test]
fn softcap_matches_composed() {
    let mut rng = SeededRng::new(1);
    check("softcap", rand(&mut rng, &[3, 7], 4.0), |x| ops::family::softcap(x, 2.5).unwrap(), |x| softcap_composed(x, 2.5));
}

#[test]
fn exact_gelu_matches_composed() {
    let mut rng = SeededRng::new(2);
    let x = rand(&mut rng, &[4, 9], 2.0);
    check("gelu_erf", x.clone(), |x| ops::family::gelu_erf(x).unwrap(), |x| {
        // x Φ(x), Φ(x) = (1 + erf(x / √2)) / 2
        (x * ((x / std::f64::consts::SQRT_2).unwrap().erf().unwrap() + 1.0).unwrap()).unwrap() * 0.5
    }
    .unwrap());
    // As the Pre of a linear (GPT-NeoX's dense_4h_to_h): the same as applying it first.
    let w = rand(&mut rng, &[9, 5], 1.0);
    check("gelu_erf inside a linear", x, |x| ops::linear::lora_linear(x, Some(ops::family::gelu_erf_pre()), std::sync::Arc::new({
        let w = w.clone();
        move |_| Ok(w.clone())
    }), None, vec![], None).unwrap(), |x| x.gelu_erf().unwrap().matmul(&w).unwrap());
}

fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    // HF's partial rotary: rotate_half on the first R values, the rest passes through.
    let (r, d) = (2 * cos.dim(D::Minus1).unwrap(), x.dim(D::Minus1).unwrap());
    let c = Tensor::cat(&[cos, cos], D::Minus1).unwrap().unsqueeze(1).unwrap();
    let s = Tensor::cat(&[sin, sin], D::Minus1).unwrap().unsqueeze(1).unwrap();
    let xr = x.narrow(D::Minus1, 0, r).unwrap();
    let (x1, x2) = (xr.narrow(D::Minus1, 0, r / 2).unwrap(), xr.narrow(D::Minus1, r / 2, r / 2).unwrap());
    let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
    let y = (xr.broadcast_mul(&c).unwrap() + rot.broadcast_mul(&s).unwrap()).unwrap();
    Tensor::cat(&[&y, &x.narrow(D::Minus1, r, d - r).unwrap()], D::Minus1).unwrap()
}

#[test]
fn partial_rope_matches_composed() {
    let mut rng = SeededRng::new(3);
    let (cos, sin) = (rand(&mut rng, &[2, 5, 2], 1.0), rand(&mut rng, &[2, 5, 2], 1.0));
    check("partial rope", rand(&mut rng, &[2, 3, 5, 8], 1.0), |x| ops::rope(x, &cos, &sin).unwrap(), |x| rope_composed(x, &cos, &sin));
    // One decoding step: (B, H, 1, D) as a transposed view (size-1 dims with odd strides, which
    // candle calls contiguous); the output must be a plain contiguous tensor.
    let (cos, sin) = (rand(&mut rng, &[3, 1, 2], 1.0), rand(&mut rng, &[3, 1, 2], 1.0));
    let x = rand(&mut rng, &[3, 1, 2, 8], 1.0).transpose(1, 2).unwrap();
    let y = ops::rope(&x, &cos, &sin).unwrap();
    assert_eq!(y.layout().stride(), &[16, 8, 8, 1], "rope's output is contiguous");
    assert!(diff(&y, &rope_composed(&x, &cos, &sin)) < 1e-6);
}

#[test]
fn soft_capped_gqa_attention_with_a_window_matches_composed() {
    let mut rng = SeededRng::new(4);
    let (b, t, h, h_kv, d, cap) = (2, 7, 4, 2, 3, 1.5);
    let valid = vec![vec![true; t], vec![false, false, true, true, true, true, true]];
    let mask = lorafit::model::window_mask(&lorafit::model::causal_mask(&valid, t, 0, &Device::Cpu).unwrap(), 3).unwrap();
    let scale = 1.0 / (d as f64).sqrt();
    let q = Var::from_tensor(&rand(&mut rng, &[b, h, t, d], 2.0)).unwrap();
    let k = Var::from_tensor(&rand(&mut rng, &[b, h_kv, t, d], 2.0)).unwrap();
    let v = Var::from_tensor(&rand(&mut rng, &[b, h_kv, t, d], 1.0)).unwrap();
    let fast = ops::attention::self_attention_capped(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, scale, Some(cap)).unwrap();
    let rep = |x: &Tensor| x.unsqueeze(2).unwrap().repeat((1, 1, h / h_kv, 1, 1)).unwrap().reshape((b, h, t, d)).unwrap();
    let s = (q.as_tensor().matmul(&rep(k.as_tensor()).t().unwrap()).unwrap() * scale).unwrap();
    let s = softcap_composed(&s, cap).broadcast_add(&mask).unwrap();
    let slow = candle_nn::ops::softmax(&s, D::Minus1).unwrap().matmul(&rep(v.as_tensor())).unwrap();
    let slow = slow.transpose(1, 2).unwrap().reshape((b, t, h * d)).unwrap();
    assert!(diff(&fast, &slow) < 1e-5, "forward differs by {}", diff(&fast, &slow));
    let r = rand(&mut rng, fast.dims(), 1.0);
    let gf = (&fast * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = (&slow * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
        let (f, s) = (gf.get(x.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}")), gs.get(x.as_tensor()).unwrap());
        assert!(diff(f, s) < 1e-4, "gradient of {name} differs by {}", diff(f, s));
    }
}

#[test]
fn window_mask_hides_keys_a_window_or_more_back() {
    // 2 cached keys + 3 queries, the first key padding; window 2: query slot i sees slots i-1, i.
    let m = lorafit::model::causal_mask(&[vec![false, true, true, true, true]], 3, 2, &Device::Cpu).unwrap();
    let w = lorafit::model::window_mask(&m, 2).unwrap();
    let seen: Vec<Vec<bool>> = w.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap().iter().map(|r| r.iter().map(|&x| x == 0.0).collect()).collect();
    let (t, f) = (true, false);
    assert_eq!(seen, vec![vec![f, t, t, f, f], vec![f, f, t, t, f], vec![f, f, f, t, t]]);
}

#[test]
fn soft_capped_lm_head_cross_entropy_matches_composed() {
    let mut rng = SeededRng::new(5);
    let w = rand(&mut rng, &[6, 11], 2.0); // (C, V)
    let t = Tensor::new(&[3u32, 0, 10, 5, 7], &Device::Cpu).unwrap();
    for (cap, temp) in [(Some(3.0), 1.0), (Some(3.0), 0.7), (None, 0.7)] {
        check(&format!("lm_head_cross_entropy cap {cap:?} temperature {temp}"), rand(&mut rng, &[5, 6], 1.0), |h| {
            ops::lm_head_cross_entropy_capped(h, &w, &t, 2, cap, 1.0 / temp).unwrap()
        }, |h| {
            let z = h.matmul(&w).unwrap();
            let z = match cap {
                Some(c) => softcap_composed(&z, c),
                None => z,
            };
            let z = (z / temp).unwrap();
            candle_nn::ops::log_softmax(&z, D::Minus1).unwrap().gather(&t.unsqueeze(1).unwrap(), D::Minus1).unwrap().squeeze(1).unwrap().neg().unwrap()
        });
    }
}

#[test]
fn heads_with_norm_and_rope_match_composed() {
    let mut rng = SeededRng::new(6);
    let (b, t, n, d) = (2, 5, 3, 8);
    let gamma = rand(&mut rng, &[d], 1.0);
    let norm = ops::rms_norm_pre(&gamma, 1e-6).unwrap();
    for r in [d, d / 2] {
        let (cos, sin) = (rand(&mut rng, &[b, t, r / 2], 1.0), rand(&mut rng, &[b, t, r / 2], 1.0));
        let rope = (cos.clone(), sin.clone());
        // From a strided view, as GPT-NeoX's head-interleaved query_key_value gives it.
        let packed = rand(&mut rng, &[b, t, n, 3 * d], 1.0);
        check(&format!("heads (rotary {r} of {d})"), packed, |x| {
            ops::family::heads(&x.narrow(3, d, d).unwrap(), Some(&norm), Some(&rope)).unwrap()
        }, |x| {
            let x = x.narrow(3, d, d).unwrap();
            let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let x = x.broadcast_div(&(ms + 1e-6).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(&gamma).unwrap();
            rope_composed(&x.transpose(1, 2).unwrap(), &cos, &sin)
        });
    }
    check("heads (plain)", rand(&mut rng, &[b, t, n, d], 1.0), |x| ops::family::heads(x, None, None).unwrap(), |x| {
        x.transpose(1, 2).unwrap().contiguous().unwrap()
    });
}

#[test]
fn gated_mlp_activation_matches_composed() {
    let mut rng = SeededRng::new(7);
    let up = Var::from_tensor(&rand(&mut rng, &[2, 3, 6], 1.0)).unwrap();
    for (name, act) in [("silu", ops::act::silu_pre()), ("gelu", ops::act::gelu_pre())] {
        let upt = up.as_tensor().clone();
        let (a1, a2) = (act.clone(), act.clone());
        check(&format!("gated {name} (d gate)"), rand(&mut rng, &[2, 3, 6], 2.0), |g| ops::family::gated(g, &upt, &a1).unwrap(), |g| {
            let a = if name == "silu" { g.silu().unwrap() } else { g.gelu().unwrap() };
            (a * &upt).unwrap()
        });
        let gate = rand(&mut rng, &[2, 3, 6], 2.0);
        check(&format!("gated {name} (d up)"), up.as_tensor().clone(), |u| ops::family::gated(&gate, u, &a2).unwrap(), |u| {
            let a = if name == "silu" { gate.silu().unwrap() } else { gate.gelu().unwrap() };
            (a * u).unwrap()
        });
    }
}
