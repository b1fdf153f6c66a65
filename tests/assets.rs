//! Real assets from ../shared/assets (not in the repo; licenses forbid copying them):
//! the pretrained tiny LLaMA stories260K against its golden outputs, and the KoGPT2 and
//! GPT-2 tokenizers against their documented ids.
mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, shared_asset};
use lorafit::generate::{generate, SamplingConfig};
use lorafit::lora::AdapterSet;
use lorafit::model::Model;
use lorafit::tokenizer::Tokenizer;
use lorafit::weights::ModelFiles;

fn stories() -> Option<(Model, Tokenizer, serde_json::Value)> {
    let dir = shared_asset("stories260K")?;
    let files = ModelFiles::from_dir(&dir, "stories260K").unwrap();
    let model = Model::load(&files, DType::F32, &Device::Cpu, AdapterSet::none()).unwrap();
    let tok = Tokenizer::load(&files.tokenizer, &files.config).unwrap();
    let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    Some((model, tok, golden))
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[test]
fn stories260k_greedy_reproduces_golden_text() {
    let Some((model, tok, g)) = stories() else { return };
    let want = ids(&g["greedy_from_bos"]["ids"]);
    let cfg = SamplingConfig { max_new_tokens: want.len() - 1, ..Default::default() };
    let out = generate(&model, &[vec![want[0]]], 0, &cfg).unwrap();
    let got: Vec<u32> = std::iter::once(want[0]).chain(out[0].iter().copied()).collect();
    assert_eq!(got, want, "greedy ids from bos");
    assert_eq!(tok.decode(&got[1..]).unwrap(), g["greedy_from_bos"]["text"].as_str().unwrap());

    // From the prompt "Once upon a time" (the tokenizer adds bos itself).
    let p = &g["prompt"];
    let prompt = tok.encode(p["text"].as_str().unwrap()).unwrap();
    assert_eq!(prompt, ids(&p["ids"]));
    let want = ids(&p["greedy_64_ids"]);
    let cfg = SamplingConfig { max_new_tokens: want.len() - prompt.len(), ..Default::default() };
    let out = generate(&model, &[prompt.clone()], 0, &cfg).unwrap();
    assert_eq!([prompt, out[0].clone()].concat(), want, "greedy from the prompt");
}

#[test]
fn stories260k_logits_and_loss_match_golden() {
    let Some((model, _tok, g)) = stories() else { return };
    let l = &g["logits_step0_from_bos"];
    let x = Tensor::new(&[1u32], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits: Vec<f32> = model.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let first8 = floats(&l["first8"]);
    assert!(max_abs_diff(&logits[..first8.len()], &first8) < 1e-3, "first logits {:?} vs {first8:?}", &logits[..first8.len()]);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let top5: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
    assert_eq!(top5, ids(&l["top5_ids"]));
    let top5v: Vec<f32> = order[..5].iter().map(|&i| logits[i]).collect();
    assert!(max_abs_diff(&top5v, &floats(&l["top5_values"])) < 1e-3);
    let sum: f32 = logits.iter().sum();
    assert!((sum - l["sum"].as_f64().unwrap() as f32).abs() < 1e-2, "logit sum {sum}");

    // 64 predictions: tokens 0..64 predict tokens 1..65.
    let greedy = ids(&g["greedy_from_bos"]["ids"]);
    let ce = model.sequence_nll(&greedy[..65]).unwrap().to_scalar::<f32>().unwrap();
    let want = g["teacher_forced_ce_first64_of_greedy"].as_f64().unwrap() as f32;
    assert!((ce - want).abs() < 1e-3, "teacher-forced CE {ce} vs {want}");
}

#[test]
fn kogpt2_tokenizer_gives_skt_documented_ids() {
    let Some(dir) = shared_asset("kogpt2") else { return };
    let tok = Tokenizer::load(&dir.join("tokenizer.json"), &dir.join("config.json")).unwrap();
    let text = "안녕하세요. 한국어 GPT-2 입니다.😤:)l^o";
    let ids = tok.encode(text).unwrap();
    assert_eq!(ids, vec![25906, 8702, 7801, 25856, 34407, 10528, 422, 426, 18258, 9241, 12521, 254, 110, 162]);
    assert_eq!(tok.decode(&ids).unwrap(), text);
    // KoGPT2's specials: </s> is both bos and eos; <pad> is a different id.
    assert_eq!((tok.eos_id, tok.pad_id), (Some(1), Some(3)));
    assert_eq!(tok.token_to_id("\n"), Some(375));
}

#[test]
fn gpt2_tokenizer_round_trips() {
    let Some(dir) = shared_asset("gpt2") else { return };
    let tok = Tokenizer::load(&dir.join("tokenizer.json"), &dir.join("config.json")).unwrap();
    let ids = tok.encode("Hello world").unwrap();
    assert_eq!(ids, vec![15496, 995]);
    assert_eq!(tok.eos_id, Some(50256));
}
