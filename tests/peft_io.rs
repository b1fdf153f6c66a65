//! Adapter folders in PEFT's format: what lorafit writes has PEFT's keys, shapes, metadata and
//! config fields, and reloads to identical tensors and outputs; new adapters start as PEFT's do.
mod common;

use candle_core::{DType, Device};
use common::*;
use lorafit::lora::{Adapter, AdapterSet, LoraConfig, TargetModules};

#[test]
fn saved_adapter_has_peft_layout_and_round_trips() {
    for m in ["gpt2-a", "llama-b"] {
        let src = fixture(m).join("adapter");
        let model = load_with_adapter(m, true);
        let dir = tempfile::tempdir().unwrap();
        lorafit::peft::save_adapter(&model.adapters.adapters[0], dir.path(), m, &[]).unwrap();

        // Same keys and shapes as the file PEFT wrote; f32; metadata {"format": "pt"}.
        let ours = candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        let peft = candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        let mut keys: Vec<_> = ours.keys().collect();
        let mut pkeys: Vec<_> = peft.keys().collect();
        keys.sort();
        pkeys.sort();
        assert_eq!(keys, pkeys, "{m}: tensor keys");
        for (k, t) in &ours {
            assert_eq!(t.dims(), peft[k].dims(), "{m}: {k}");
            assert_eq!(t.dtype(), DType::F32);
            let d = max_abs_diff(&t.flatten_all().unwrap().to_vec1().unwrap(), &peft[k].flatten_all().unwrap().to_vec1().unwrap());
            assert_eq!(d, 0.0, "{m}: {k} changed on a round trip");
        }
        let bytes = std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"));

        // Config: PEFT's fields, sorted keys, fan_in_fan_out for GPT-2's Conv1D.
        let text = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
        let pcfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
        for k in ["r", "lora_alpha", "use_rslora", "peft_type", "task_type", "bias", "fan_in_fan_out", "lora_dropout"] {
            assert_eq!(cfg[k].as_f64().map(|x| x.to_string()).unwrap_or(cfg[k].to_string()),
                       pcfg[k].as_f64().map(|x| x.to_string()).unwrap_or(pcfg[k].to_string()), "{m}: {k}");
        }
        assert_eq!(cfg["inference_mode"], true);
        assert_eq!(cfg["base_model_name_or_path"], m);
        let obj_keys: Vec<&String> = cfg.as_object().unwrap().keys().collect();
        let mut sorted = obj_keys.clone();
        sorted.sort();
        assert_eq!(obj_keys, sorted, "keys are written sorted, as PEFT does");

        // Reloading gives the same outputs as PEFT's own file.
        let a = lorafit::peft::load_adapter(dir.path(), "reloaded", 1.0, false).unwrap();
        let e = expected(m);
        let reloaded = load(m, AdapterSet::new(vec![a]));
        let nll = reloaded.sequence_nll(&e.ids[1]).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((nll - e.adapter.nll[1]).abs() < 2e-4, "{m}: reloaded adapter nll {nll}");
    }
}

#[test]
fn keys_with_the_default_adapter_name_load_too() {
    let src = fixture("llama-a").join("adapter");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("adapter_config.json"), dir.path().join("adapter_config.json")).unwrap();
    let t = candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let renamed: std::collections::HashMap<_, _> =
        t.into_iter().map(|(k, v)| (k.replace(".weight", ".default.weight"), v)).collect();
    candle_core::safetensors::save(&renamed, dir.path().join("adapter_model.safetensors")).unwrap();
    let a = lorafit::peft::load_adapter(dir.path(), "a", 1.0, false).unwrap();
    let e = expected("llama-a");
    let nll = load("llama-a", AdapterSet::new(vec![a])).sequence_nll(&e.ids[0]).unwrap().to_scalar::<f32>().unwrap() as f64;
    assert!((nll - e.adapter.nll[0]).abs() < 2e-4);
}

#[test]
fn fresh_adapter_starts_as_peft_does_and_is_seeded() {
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 16.0,
        target_modules: TargetModules::List(vec!["c_attn".into(), "c_proj".into()]),
        ..Default::default()
    };
    let make = |seed| {
        let a = Adapter::fresh("new", cfg.clone(), seed).unwrap();
        let model = load("gpt2-a", AdapterSet::new(vec![a.clone()]));
        (a, model)
    };
    let (a, model) = make(7);
    // suffix match: c_proj hits attn.c_proj and mlp.c_proj; 2 layers x 3 modules.
    assert_eq!(a.modules().len(), 6);
    for m in a.modules() {
        let (r, inp) = m.a.dims2().unwrap();
        assert_eq!(r, 4);
        let bound = 1.0 / (inp as f32).sqrt();
        let av: Vec<f32> = m.a.flatten_all().unwrap().to_vec1().unwrap();
        assert!(av.iter().all(|x| x.abs() <= bound) && av.iter().any(|&x| x != 0.0), "{}: Kaiming-uniform A", m.path);
        assert!(m.b.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|&x| x == 0.0), "{}: B starts at zero", m.path);
        assert_eq!(m.scaling, 4.0);
    }
    // B = 0: the new adapter is the base model exactly.
    let e = expected("gpt2-a");
    let nll = model.sequence_nll(&e.ids[0]).unwrap().to_scalar::<f32>().unwrap() as f64;
    assert!((nll - e.base.nll[0]).abs() < 2e-4);
    // Same seed, same A; another seed, another A.
    let (a2, _) = make(7);
    let (a3, _) = make(8);
    let first = |a: &Adapter| a.modules()[0].a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(first(&a), first(&a2));
    assert_ne!(first(&a), first(&a3));
    assert!(a.vars().iter().all(|(_, v)| v.dtype() == DType::F32));
}

#[test]
fn half_precision_base_stays_close_and_lora_stays_f32() {
    let e = expected("llama-a");
    for dt in [DType::BF16, DType::F16] {
        let a = lorafit::peft::load_adapter(&fixture("llama-a").join("adapter"), "a", 1.0, true).unwrap();
        let model = lorafit::model::Model::load(&files("llama-a"), dt, &Device::Cpu, AdapterSet::new(vec![a.clone()])).unwrap();
        let loss = model.sequence_nll(&e.ids[0]).unwrap();
        let nll = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((nll - e.adapter.nll[0]).abs() < 0.05, "{dt:?}: nll {nll} vs f32 {}", e.adapter.nll[0]);
        let grads = loss.backward().unwrap();
        for (k, v) in a.vars() {
            assert_eq!(v.dtype(), DType::F32, "{k}: trainable tensors stay f32");
            let g = grads.get(v.as_tensor()).unwrap();
            assert_eq!(g.dtype(), DType::F32);
            assert!(g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().is_finite());
        }
    }
}
