//! lorafit against transformers + PEFT, number for number (tolerance 1e-4 on logits, 2e-4 on
//! NLL, exact greedy ids). Fixtures: tests/fixtures, written by scripts/fixtures/make_fixtures.py
//! from four tiny random checkpoints: GPT-2 (safetensors; pytorch_model.bin, odd widths, 3
//! layers, rsLoRA) and LLaMA (GQA, untied head, top-level rope_theta; explicit head_dim,
//! tied head, rope_parameters, sharded safetensors).
mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use lorafit::generate::{generate, SamplingConfig};
use lorafit::lora::AdapterSet;
use lorafit::tokenizer::Tokenizer;

#[test]
fn tokenizer_matches_hf_tokenizers() {
    for m in MODELS {
        let e = expected(m);
        let f = files(m);
        let tok = Tokenizer::load(&f.tokenizer, &f.config).unwrap();
        for (line, ids) in e.lines.iter().zip(&e.ids) {
            assert_eq!(&tok.encode(line).unwrap(), ids, "{m}: {line:?}");
            assert_eq!(&tok.decode(ids).unwrap(), line, "{m}: decode");
        }
    }
}

fn check_outputs(m: &str, model: &lorafit::model::Model, want: &Outputs, e: &Expected, what: &str) {
    let got = logits(model, &e.ids[0]);
    assert_eq!(got.len(), want.logits0.len(), "{m} {what}: positions");
    for (t, (g, w)) in got.iter().zip(&want.logits0).enumerate() {
        let d = max_abs_diff(g, w);
        assert!(d < 1e-4, "{m} {what}: logits at position {t} differ by {d}");
    }
    for (i, ids) in e.ids.iter().enumerate() {
        let nll = model.sequence_nll(ids).unwrap().to_scalar::<f32>().unwrap() as f64;
        let d = (nll - want.nll[i]).abs();
        assert!(d < 2e-4, "{m} {what}: line {i} nll {nll} vs transformers {} (diff {d})", want.nll[i]);
    }
}

#[test]
fn base_logits_and_nll_match_transformers() {
    for m in MODELS {
        let e = expected(m);
        check_outputs(m, &load(m, AdapterSet::none()), &e.base, &e, "base");
    }
}

#[test]
fn adapter_logits_and_nll_match_peft() {
    for m in MODELS {
        let e = expected(m);
        let model = load_with_adapter(m, false);
        let a = &model.adapters.adapters[0];
        let (_, s) = a.config.rank_and_scaling("");
        assert!((s - e.scaling).abs() < 1e-12, "{m}: scaling {s} vs PEFT {}", e.scaling);
        check_outputs(m, &model, &e.adapter, &e, "adapter");
    }
}

#[test]
fn disabled_adapters_give_the_base_model() {
    for m in ["gpt2-a", "llama-a"] {
        let e = expected(m);
        let model = load_with_adapter(m, false);
        {
            let _off = model.adapters.disabled();
            check_outputs(m, &model, &e.base, &e, "adapters disabled");
        }
        // The guard restores the adapters when dropped.
        check_outputs(m, &model, &e.adapter, &e, "adapters re-enabled");
    }
}

#[test]
fn batched_left_padded_greedy_matches_transformers() {
    for m in MODELS {
        let e = expected(m);
        let g = &e.generate;
        let cfg = SamplingConfig { max_new_tokens: g.max_new_tokens, ..Default::default() };
        let base = load(m, AdapterSet::none());
        assert_eq!(generate(&base, &g.prompts_ids, g.pad_id, &cfg).unwrap(), g.base_greedy, "{m}: base greedy");
        let with = load_with_adapter(m, false);
        assert_eq!(generate(&with, &g.prompts_ids, g.pad_id, &cfg).unwrap(), g.adapter_greedy, "{m}: adapter greedy");
        // One row alone gives what it gives in the batch.
        for (p, want) in g.prompts_ids.iter().zip(&g.adapter_greedy) {
            assert_eq!(&generate(&with, std::slice::from_ref(p), g.pad_id, &cfg).unwrap()[0], want, "{m}: unbatched");
        }
    }
}

#[test]
fn gpt2_checkpoint_without_transformer_prefix_loads() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("gpt2-a");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let renamed: std::collections::HashMap<String, Tensor> =
        tensors.into_iter().map(|(k, v)| (k.strip_prefix("transformer.").unwrap_or(&k).to_string(), v)).collect();
    assert!(renamed.contains_key("wte.weight"));
    candle_core::safetensors::save(&renamed, dir.path().join("model.safetensors")).unwrap();
    let files = lorafit::weights::ModelFiles::from_dir(dir.path(), "noprefix").unwrap();
    let a = lorafit::peft::load_adapter(&src.join("adapter"), "a", 1.0, false).unwrap();
    let model = lorafit::model::Model::load(&files, DType::F32, &Device::Cpu, AdapterSet::new(vec![a])).unwrap();
    let e = expected("gpt2-a");
    check_outputs("gpt2-a (no prefix)", &model, &e.adapter, &e, "adapter");
}

#[test]
fn lora_gradients_match_torch_and_store_nothing_base_sized() {
    for m in MODELS {
        let e = expected(m);
        let model = load_with_adapter(m, true);
        let loss = model.sequence_nll(&e.ids[0]).unwrap();
        let grads = loss.backward().unwrap();
        let want = candle_core::safetensors::load(fixture(m).join("grads.safetensors"), &Device::Cpu).unwrap();
        let want_loss = want["loss"].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        assert!((loss.to_scalar::<f32>().unwrap() - want_loss).abs() < 2e-4, "{m}: loss");

        let vars = model.adapters.adapters[0].vars();
        assert_eq!(vars.len() + 1, want.len(), "{m}: one gradient per LoRA tensor");
        for (key, var) in &vars {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{m}: no gradient for {key}"));
            let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            let w: Vec<f32> = want[key].flatten_all().unwrap().to_vec1().unwrap();
            assert!(g.iter().all(|x| x.is_finite()), "{m}: {key} gradient not finite");
            assert!(g.iter().any(|&x| x != 0.0), "{m}: {key} gradient is all zero");
            let scale = w.iter().fold(0f32, |a, x| a.max(x.abs()));
            let d = max_abs_diff(&g, &w);
            assert!(d <= 1e-4 * scale.max(1e-3), "{m}: {key} gradient differs from torch by {d} (max |g| {scale})");
        }

        // Nothing base-sized in the store: no gradient has a frozen weight's shape, and all of
        // them together are far smaller than the base (candle would keep a dW per layer).
        let var_ids: std::collections::HashSet<_> = vars.iter().map(|(_, v)| v.as_tensor().id()).collect();
        let f = files(m);
        let vb_shapes: Vec<Vec<usize>> = match &f.weights {
            lorafit::weights::WeightFiles::Safetensors(files) => files
                .iter()
                .flat_map(|p| candle_core::safetensors::load(p, &Device::Cpu).unwrap().into_values().map(|t| t.dims().to_vec()))
                .collect(),
            lorafit::weights::WeightFiles::Pth(p) => {
                candle_core::pickle::read_all(p).unwrap().into_iter().map(|(_, t)| t.dims().to_vec()).collect()
            }
        };
        let base_params: usize = vb_shapes.iter().map(|s| s.iter().product::<usize>()).sum();
        let mut stored_other = 0;
        for id in grads.get_ids() {
            let g = grads.get_id(*id).unwrap();
            if !var_ids.contains(id) {
                stored_other += g.elem_count();
                let mut rev = g.dims().to_vec();
                rev.reverse();
                assert!(
                    !vb_shapes.iter().any(|s| s.len() == 2 && (s == g.dims() || *s == rev)),
                    "{m}: a gradient of shape {:?} (a frozen weight's shape) is in the store",
                    g.dims()
                );
            }
        }
        // What remains besides the adapter grads are the few activation-sized input grads of
        // the first adapted layer (its input does not depend on any Var).
        assert!(stored_other * 10 < base_params, "{m}: gradient store holds {stored_other} non-adapter values, base has {base_params}");
    }
}

#[test]
fn stacked_adapters_add_their_weighted_deltas() {
    let e = expected("gpt2-a");
    let dir = fixture("gpt2-a").join("adapter");
    let with = |specs: &[f64]| {
        let a = specs.iter().enumerate().map(|(i, &w)| lorafit::peft::load_adapter(&dir, &format!("a{i}"), w, false).unwrap()).collect();
        logits(&load("gpt2-a", AdapterSet::new(a)), &e.ids[0])
    };
    let flat = |l: Vec<Vec<f32>>| l.concat();
    // The same adapter twice at 0.5 each is the adapter once at 1.0; at weight 0 it is the base.
    let d = max_abs_diff(&flat(with(&[0.5, 0.5])), &flat(with(&[1.0])));
    assert!(d < 1e-5, "0.5 + 0.5 vs 1.0: {d}");
    let d = max_abs_diff(&flat(with(&[0.0])), &e.base.logits0.concat());
    assert!(d < 1e-4, "weight 0 vs base: {d}");
    let d = max_abs_diff(&flat(with(&[1.0])), &e.adapter.logits0.concat());
    assert!(d < 1e-4, "weight 1 vs PEFT: {d}");
}
