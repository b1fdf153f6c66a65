//! The 4-bit (NF4) frozen base: the quantized matmul's forward and input gradient equal the
//! same product with the dequantized weight in f32; quantization error is bounded; a 4-bit
//! model stays close to its f32 self and LoRA on top still gets every gradient.
mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use lorafit::lora::AdapterSet;
use lorafit::quant::{nf4_linear, roundtrip_error, BaseQuant, Nf4, NF4_LEVELS};
use lorafit::rng::SeededRng;

#[test]
fn nf4_matmul_forward_and_input_gradient_match_the_dequantized_reference() {
    let mut rng = SeededRng::new(3);
    for (transpose, shape) in [(true, [24usize, 40]), (false, [40, 24])] {
        // (out, in) = (24, 40) nn.Linear layout, or (in, out) = (40, 24) Conv1D layout; 960 = 15 blocks.
        let w = rng.normal(&shape, 0.05, &Device::Cpu).unwrap();
        let q = Nf4::quantize(&w).unwrap();
        assert_eq!(q.nbytes(), 960 / 2 + 4 * 15, "4.5 bits per weight");
        let wd = q.dequantize(DType::F32).unwrap();
        let w_in_out = if transpose { wd.t().unwrap() } else { wd.clone() };
        let b = rng.normal(&[24], 0.1, &Device::Cpu).unwrap();
        let x = Var::from_tensor(&rng.normal(&[2, 3, 40], 1.0, &Device::Cpu).unwrap()).unwrap();
        let r = rng.normal(&[2, 3, 24], 1.0, &Device::Cpu).unwrap();
        let y = nf4_linear(x.as_tensor(), &q, transpose, Some(&b)).unwrap();
        let y_ref = x.as_tensor().broadcast_matmul(&w_in_out).unwrap().broadcast_add(&b).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(max_abs_diff(&flat(&y), &flat(&y_ref)) < 1e-5, "forward");
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (&y_ref * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let (gx, gx_ref) = (g.get(x.as_tensor()).unwrap(), g_ref.get(x.as_tensor()).unwrap());
        assert!(max_abs_diff(&flat(gx), &flat(gx_ref)) < 1e-5, "input gradient");
        // Only the input gets a gradient: nothing weight-shaped is stored.
        assert!(g.get_ids().all(|id| g.get_id(*id).unwrap().dims() != shape.as_slice()));
    }
}

#[test]
fn nf4_levels_and_roundtrip_error() {
    assert_eq!(NF4_LEVELS.len(), 16);
    assert!(NF4_LEVELS.windows(2).all(|w| w[0] < w[1]));
    let w = SeededRng::new(4).normal(&[64, 100], 1.0, &Device::Cpu).unwrap();
    // The widest gap between levels is 1 - 0.723, so the error is at most ~0.14 of a block's absmax.
    assert!(roundtrip_error(&w).unwrap() < 0.15);
    // Exactly representable values survive.
    let exact = Tensor::new(&[1.0f32, -1.0, 0.0, 0.5626170], &Device::Cpu).unwrap();
    let back: Vec<f32> = Nf4::quantize(&exact).unwrap().dequantize(DType::F32).unwrap().to_vec1().unwrap();
    assert!(max_abs_diff(&back, &[1.0, -1.0, 0.0, 0.562617]) < 1e-6);
}

#[test]
fn four_bit_model_stays_close_and_trains_lora() {
    for m in ["gpt2-a", "llama-a"] {
        let e = expected(m);
        let a = lorafit::peft::load_adapter(&fixture(m).join("adapter"), "a", 1.0, true).unwrap();
        let set = AdapterSet::new(vec![a.clone()]).with_base_quant(BaseQuant::Nf4);
        let model = lorafit::model::Model::load(&files(m), DType::F32, &Device::Cpu, set).unwrap();
        let loss = model.sequence_nll(&e.ids[0]).unwrap();
        let nll = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((nll - e.adapter.nll[0]).abs() < 0.1, "{m}: 4-bit NLL {nll} vs f32 {}", e.adapter.nll[0]);
        let grads = loss.backward().unwrap();
        for (k, v) in a.vars() {
            let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{m}: no gradient for {k}"));
            let s = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(s.is_finite() && s > 0.0, "{m}: {k}");
        }
    }
}

#[test]
fn four_bit_stories260k_perplexity_stays_close() {
    let Some(dir) = shared_asset("stories260K") else { return };
    let files = lorafit::weights::ModelFiles::from_dir(&dir, "stories260K").unwrap();
    let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let ids: Vec<u32> = golden["greedy_from_bos"]["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let nll = |q| {
        let model = lorafit::model::Model::load(&files, DType::F32, &Device::Cpu, AdapterSet::none().with_base_quant(q)).unwrap();
        model.sequence_nll(&ids[..128]).unwrap().to_scalar::<f32>().unwrap()
    };
    let (full, four) = (nll(BaseQuant::None), nll(BaseQuant::Nf4));
    eprintln!("stories260K NLL: f32 {full:.4}, nf4 {four:.4}");
    assert!(four > full - 0.05 && four < full + 0.35, "f32 {full} vs nf4 {four}");
}
