//! The `<arch>.*` metadata of each family, as llama.cpp's `convert_hf_to_gguf.py` writes it from
//! config.json (`TextModel.set_gguf_parameters` = [`base_hparams`], then each model class's own
//! keys), the tensors it computes from the config (Llama 3's `rope_freqs`, Phi-3's long/short
//! rope factors), and the refusals: a setting llama.cpp's model would run differently from
//! transformers (its query scale, layer patterns or RoPE kind are not in the file) is an error
//! that says why. Used by the family table in [`super::arch`].
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value as Json;

use super::gguf::Value;

fn num(c: &Json, keys: &[&str]) -> Option<f64> {
    keys.iter().find_map(|k| c.get(*k).and_then(Json::as_f64))
}

fn int(c: &Json, keys: &[&str]) -> Result<u32> {
    num(c, keys).map(|x| x as u32).with_context(|| format!("config.json has no {}", keys.join(" / ")))
}

/// The rope parameters as the converter normalises them (`ModelBase.__init__`):
/// `rope_parameters` (transformers 5) or `rope_scaling`, with the top-level `rope_theta`,
/// `type`, `partial_rotary_factor` and `original_max_position_embeddings` mirrored in unless
/// the parameters are per attention kind (`full_attention` / `sliding_attention`).
fn rope_params(c: &Json) -> Json {
    let mut p = c.get("rope_parameters").or_else(|| c.get("rope_scaling")).filter(|v| v.is_object()).cloned().unwrap_or(serde_json::json!({}));
    let o = p.as_object_mut().expect("an object"); // filtered to objects (or `{}`) above
    if !o.contains_key("full_attention") && !o.contains_key("sliding_attention") {
        if let Some(t) = ["rope_local_base_freq", "local_rope_theta"].iter().find_map(|k| c.get(*k).filter(|v| v.is_number())) {
            o.insert("sliding_attention".into(), serde_json::json!({"rope_theta": t}));
        }
        if !o.contains_key("rope_theta") {
            if let Some(t) = ["rope_theta", "rotary_emb_base"].iter().find_map(|k| c.get(*k).filter(|v| v.is_number())) {
                o.insert("rope_theta".into(), t.clone());
            }
        }
        if !o.contains_key("rope_type") {
            if let Some(t) = o.get("type").cloned() {
                o.insert("rope_type".into(), t);
            }
        }
        for k in ["partial_rotary_factor", "original_max_position_embeddings"] {
            if !o.contains_key(k) {
                if let Some(v) = c.get(k).filter(|v| v.is_number()) {
                    o.insert(k.into(), v.clone());
                }
            }
        }
    }
    p
}

/// The parameters of the full-attention layers (the whole object when not split by kind).
fn full_rope(p: &Json) -> &Json {
    p.get("full_attention").unwrap_or(p)
}

/// Layer patterns are built per layer: a bound far above any real model, so that a corrupt
/// config.json cannot ask for a huge allocation.
const MAX_LAYERS: u32 = 100_000;

fn f32v(x: f64) -> Value {
    Value::F32(x as f32)
}

/// `head_dim` when config.json states it (not null).
fn head_dim(c: &Json) -> Option<u32> {
    num(c, &["head_dim"]).map(|x| x as u32)
}

/// `TextModel.set_gguf_parameters`: the keys every text family gets (unprefixed), in its order.
pub fn base_hparams(c: &Json) -> Result<Vec<(&'static str, Value)>> {
    let mut v = vec![("block_count", Value::U32(int(c, &["n_layers", "num_hidden_layers", "n_layer", "num_layers"])?))];
    if let Some(x) = num(c, &["max_position_embeddings", "n_ctx", "n_positions"]) {
        v.push(("context_length", Value::U32(x as u32)));
    }
    if let Some(x) = num(c, &["hidden_size", "n_embd"]) {
        v.push(("embedding_length", Value::U32(x as u32)));
    }
    if let Some(x) = num(c, &["intermediate_size", "n_inner"]) {
        v.push(("feed_forward_length", Value::U32(x as u32)));
    }
    if let Some(x) = num(c, &["num_attention_heads", "n_head"]) {
        v.push(("attention.head_count", Value::U32(x as u32)));
    }
    if let Some(x) = num(c, &["num_key_value_heads"]) {
        v.push(("attention.head_count_kv", Value::U32(x as u32)));
    }
    let p = rope_params(c);
    let fr = full_rope(&p);
    match (fr.get("rope_type").and_then(Json::as_str), fr.get("factor").and_then(Json::as_f64)) {
        (Some("linear"), Some(factor)) => {
            v.push(("rope.scaling.type", Value::Str("linear".into())));
            v.push(("rope.scaling.factor", f32v(factor)));
        }
        (Some("yarn"), Some(factor)) => {
            v.push(("rope.scaling.type", Value::Str("yarn".into())));
            v.push(("rope.scaling.factor", f32v(factor)));
            let orig = fr.get("original_max_position_embeddings").and_then(Json::as_f64).context("yarn rope_parameters without original_max_position_embeddings")?;
            v.push(("rope.scaling.original_context_length", Value::U32(orig as u32)));
            for (k, keys) in [
                ("rope.scaling.yarn_ext_factor", &["extrapolation_factor"][..]),
                ("rope.scaling.yarn_attn_factor", &["attention_factor", "attn_factor"][..]),
                ("rope.scaling.yarn_beta_fast", &["beta_fast"][..]),
                ("rope.scaling.yarn_beta_slow", &["beta_slow"][..]),
            ] {
                if let Some(x) = keys.iter().find_map(|key| fr.get(*key).and_then(Json::as_f64)) {
                    v.push((k, f32v(x)));
                }
            }
        }
        (Some("su" | "longrope"), _) => v.push(("rope.scaling.type", Value::Str("longrope".into()))),
        // default: nothing; llama3: the rope_freqs tensor; dynamic: llama.cpp has no NTK scaling.
        (Some("dynamic"), _) => bail!("rope_type \"dynamic\" (NTK-aware scaling): llama.cpp has no such RoPE, so it would compute other logits than transformers"),
        _ => {}
    }
    if let Some(t) = fr.get("rope_theta").and_then(Json::as_f64) {
        v.push(("rope.freq_base", f32v(t)));
    }
    if let Some(t) = p.get("sliding_attention").and_then(|s| s.get("rope_theta")).and_then(Json::as_f64) {
        v.push(("rope.freq_base_swa", f32v(t)));
    }
    if let Some(e) = num(c, &["rms_norm_eps", "norm_eps"]) {
        v.push(("attention.layer_norm_rms_epsilon", f32v(e)));
    }
    if let Some(e) = num(c, &["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"]) {
        v.push(("attention.layer_norm_epsilon", f32v(e)));
    }
    if let Some(d) = head_dim(c) {
        v.push(("attention.key_length", Value::U32(d)));
        v.push(("attention.value_length", Value::U32(d)));
    }
    Ok(v)
}

fn prefixed(arch: &str, v: Vec<(&str, Value)>) -> Vec<(String, Value)> {
    v.into_iter().map(|(k, x)| (format!("{arch}.{k}"), x)).collect()
}

/// Replaces the value of `k` in place (the converter's writer keeps a key's first position
/// when a subclass writes it again) or appends it.
fn set(v: &mut Vec<(&'static str, Value)>, k: &'static str, x: Value) {
    match v.iter_mut().find(|(key, _)| *key == k) {
        Some(e) => e.1 = x,
        None => v.push((k, x)),
    }
}

/// The attention head size: `head_dim`, else hidden / heads.
fn head_size(c: &Json) -> Result<u32> {
    Ok(head_dim(c).unwrap_or(int(c, &["hidden_size"])? / int(c, &["num_attention_heads"])?.max(1)))
}

/// `llama.*` (Llama, Llama 3.x, Mistral): TextModel's keys + LlamaModel's (vocab size, rope
/// dimensions). transformers' LlamaConfig always has a head_dim; Mistral's only when stated.
pub fn llama_hparams(c: &Json) -> Result<Vec<(String, Value)>> {
    let mut v = base_hparams(c)?;
    if head_dim(c).is_none() && c.get("model_type").and_then(Json::as_str) == Some("llama") {
        let d = head_size(c)?;
        v.push(("attention.key_length", Value::U32(d)));
        v.push(("attention.value_length", Value::U32(d)));
    }
    v.push(("vocab_size", Value::U32(int(c, &["vocab_size"])?)));
    v.push(("rope.dimension_count", Value::U32(head_size(c)?)));
    Ok(prefixed("llama", v))
}

/// Notes for settings llama.cpp's model ignores but that leave the logits unchanged up to a
/// context length (Mistral's / Qwen2's / Phi-3's sliding window: llama.cpp's llama and qwen2
/// attend to the whole context, and its phi3 disables the window it reads).
pub fn notes(c: &Json, arch: &str) -> Vec<String> {
    let sw = num(c, &["sliding_window"]);
    let used = match arch {
        "llama" | "phi3" => sw.is_some(),
        "qwen2" => sw.is_some() && c.get("use_sliding_window").and_then(Json::as_bool) == Some(true),
        _ => false,
    };
    match (used, sw) {
        (true, Some(w)) => vec![format!(
            "config.json's sliding_window = {w}: llama.cpp's {arch} model has no sliding-window attention, so it matches transformers for contexts up to {w} tokens and attends to the whole context beyond"
        )],
        _ => vec![],
    }
}

/// `qwen2.*`: TextModel's keys.
pub fn qwen2_hparams(c: &Json) -> Result<Vec<(String, Value)>> {
    Ok(prefixed("qwen2", base_hparams(c)?))
}

/// `qwen3.*`: TextModel's keys (Qwen3Config always has a head_dim).
pub fn qwen3_hparams(c: &Json) -> Result<Vec<(String, Value)>> {
    let mut v = base_hparams(c)?;
    if head_dim(c).is_none() {
        let d = head_size(c)?;
        v.push(("attention.key_length", Value::U32(d)));
        v.push(("attention.value_length", Value::U32(d)));
    }
    Ok(prefixed("qwen3", v))
}

/// What llama.cpp's Gemma 2 / 3 cannot represent, checked for both.
fn gemma_checks(c: &Json, arch: &str, n_layer_27b: u32) -> Result<()> {
    if c.get("tie_word_embeddings").and_then(Json::as_bool) == Some(false) {
        bail!("tie_word_embeddings is false: llama.cpp's {arch} always uses the token embedding as the output layer (its converter drops lm_head.weight), so a separate lm_head would be lost")
    }
    // llama.cpp's query scale: 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B size
    // (told by the layer count); query_pre_attn_scalar is not in the file.
    let layers = int(c, &["num_hidden_layers"])?;
    let want = if layers == n_layer_27b { int(c, &["hidden_size"])? / int(c, &["num_attention_heads"])?.max(1) } else { head_size(c)? };
    if let Some(q) = num(c, &["query_pre_attn_scalar"]) {
        if (q - want as f64).abs() > 1e-9 {
            bail!("query_pre_attn_scalar = {q}: llama.cpp's {arch} scales queries by 1/sqrt({want}) for a model of {layers} layers, so it would compute other logits than transformers")
        }
    }
    Ok(())
}

/// `gemma3.*`: TextModel's keys, then Gemma3Model's (defaults of Gemma3TextConfig).
pub fn gemma3_hparams(c: &Json) -> Result<Vec<(String, Value)>> {
    gemma_checks(c, "gemma3", 62)?;
    if num(c, &["attn_logit_softcapping"]).is_some() {
        bail!("attn_logit_softcapping is set: llama.cpp's gemma3 has no attention soft-capping (its converter refuses such a model)")
    }
    let layers = int(c, &["num_hidden_layers"])?;
    ensure!(layers <= MAX_LAYERS, "num_hidden_layers = {layers}: more than any model llama.cpp runs");
    let window = num(c, &["sliding_window"]);
    let pattern = num(c, &["sliding_window_pattern"]);
    // llama.cpp reads no layer pattern from a gemma3 file: every 6th layer is global.
    if window.is_some() && pattern != Some(1.0) {
        let want: Vec<bool> = (0..layers).map(|i| (i + 1) % 6 != 0).collect();
        let got: Option<Vec<bool>> = c.get("layer_types").and_then(Json::as_array).map(|a| a.iter().map(|t| t.as_str() == Some("sliding_attention")).collect());
        let got = got.unwrap_or_else(|| (0..layers).map(|i| (i + 1) % (pattern.unwrap_or(6.0) as u32).max(1) != 0).collect());
        if got != want {
            bail!("layer_types {got:?} (true = sliding): llama.cpp's gemma3 makes every 6th layer global ({want:?}), so it would compute other logits than transformers")
        }
    }
    let mut v = base_hparams(c)?;
    set(&mut v, "context_length", Value::U32(num(c, &["max_position_embeddings"]).map_or(131072, |x| x as u32)));
    set(&mut v, "attention.head_count", Value::U32(num(c, &["num_attention_heads"]).map_or(8, |x| x as u32)));
    set(&mut v, "attention.layer_norm_rms_epsilon", f32v(num(c, &["rms_norm_eps"]).unwrap_or(1e-6)));
    set(&mut v, "attention.key_length", Value::U32(head_dim(c).unwrap_or(256)));
    set(&mut v, "attention.value_length", Value::U32(head_dim(c).unwrap_or(256)));
    let p = rope_params(c);
    set(&mut v, "rope.freq_base", f32v(full_rope(&p).get("rope_theta").and_then(Json::as_f64).unwrap_or(1_000_000.0)));
    if let Some(cap) = num(c, &["final_logit_softcapping"]).filter(|x| *x != 0.0) {
        set(&mut v, "final_logit_softcapping", f32v(cap));
    }
    if pattern != Some(1.0) {
        set(&mut v, "attention.sliding_window", Value::U32(window.context("config.json has no sliding_window")? as u32));
    }
    set(&mut v, "attention.head_count_kv", Value::U32(num(c, &["num_key_value_heads"]).map_or(4, |x| x as u32)));
    Ok(prefixed("gemma3", v))
}

/// `gemma2.*`: Gemma2Model's own list (it does not call TextModel's).
pub fn gemma2_hparams(c: &Json) -> Result<Vec<(String, Value)>> {
    gemma_checks(c, "gemma2", 46)?;
    // llama.cpp reads no layer pattern from a gemma2 file: even layers sliding, odd global.
    if let Some(a) = c.get("layer_types").and_then(Json::as_array) {
        let got: Vec<bool> = a.iter().map(|t| t.as_str() == Some("sliding_attention")).collect();
        let want: Vec<bool> = (0..got.len()).map(|i| i % 2 == 0).collect();
        if got != want {
            bail!("layer_types {got:?} (true = sliding): llama.cpp's gemma2 alternates sliding and global layers ({want:?}), so it would compute other logits than transformers")
        }
    }
    let heads = int(c, &["num_attention_heads"])?;
    let v = vec![
        ("context_length", Value::U32(int(c, &["max_position_embeddings"])?)),
        ("embedding_length", Value::U32(int(c, &["hidden_size"])?)),
        ("block_count", Value::U32(int(c, &["num_hidden_layers"])?)),
        ("feed_forward_length", Value::U32(int(c, &["intermediate_size"])?)),
        ("attention.head_count", Value::U32(heads)),
        ("attention.head_count_kv", Value::U32(num(c, &["num_key_value_heads"]).map_or(heads, |x| x as u32))),
        ("attention.layer_norm_rms_epsilon", f32v(num(c, &["rms_norm_eps"]).context("config.json has no rms_norm_eps")?)),
        ("attention.key_length", Value::U32(head_size(c)?)),
        ("attention.value_length", Value::U32(head_size(c)?)),
        ("attn_logit_softcapping", f32v(num(c, &["attn_logit_softcapping"]).context("config.json has no attn_logit_softcapping")?)),
        ("final_logit_softcapping", f32v(num(c, &["final_logit_softcapping"]).context("config.json has no final_logit_softcapping")?)),
        ("attention.sliding_window", Value::U32(int(c, &["sliding_window"])?)),
    ];
    Ok(prefixed("gemma2", v))
}

/// `exaone4.*`: TextModel's keys, the vocabulary size and the sliding-window layer pattern.
pub fn exaone4_hparams(c: &Json) -> Result<Vec<(String, Value)>> {
    let mut v = base_hparams(c)?;
    v.push(("vocab_size", Value::U32(int(c, &["vocab_size"])?)));
    let layers_n = int(c, &["num_hidden_layers"])?;
    ensure!(layers_n <= MAX_LAYERS, "num_hidden_layers = {layers_n}: more than any model llama.cpp runs");
    let any_sliding = c.get("layer_types").and_then(Json::as_array).map_or(num(c, &["sliding_window_pattern"]).is_some() || c.get("sliding_window_pattern").is_some_and(Json::is_string), |a| {
        a.iter().any(|t| t.as_str() == Some("sliding_attention"))
    });
    if num(c, &["sliding_window"]).is_some() && any_sliding && layers_n != 64 {
        bail!("sliding-window layers in a model of {layers_n} layers: llama.cpp's exaone4 applies the sliding window (and the global layers' missing RoPE) only to the 64-layer model, so it would compute other logits than transformers")
    }
    if let Some(w) = num(c, &["sliding_window"]) {
        v.push(("attention.sliding_window", Value::U32(w as u32)));
        let layers = int(c, &["num_hidden_layers"])? as usize;
        let pattern: Option<Vec<bool>> = if let Some(a) = c.get("layer_types").and_then(Json::as_array) {
            Some(a.iter().map(|t| t.as_str() == Some("sliding_attention")).collect())
        } else if let Some(s) = c.get("sliding_window_pattern").and_then(Json::as_str) {
            Some((0..layers).map(|i| s.as_bytes().get(i % s.len().max(1)) == Some(&b'L')).collect())
        } else {
            num(c, &["sliding_window_pattern"]).map(|n| (0..layers).map(|i| (i + 1) % (n as usize).max(1) != 0).collect())
        };
        if let Some(p) = pattern.filter(|p| p.len() == layers) {
            v.push(("attention.sliding_window_pattern", Value::Arr(p.into_iter().map(Value::Bool).collect())));
        }
    }
    Ok(prefixed("exaone4", v))
}

/// `exaone.*` (EXAONE 3.5): TextModel's keys and the rope dimensions.
pub fn exaone_hparams(c: &Json) -> Result<Vec<(String, Value)>> {
    if let Some(a) = c.get("activation_function").and_then(Json::as_str).filter(|a| *a != "silu") {
        bail!("activation_function {a:?}: llama.cpp's exaone runs SiLU only")
    }
    let mut v = base_hparams(c)?;
    // transformers' ExaoneConfig reads layer_norm_epsilon as rms_norm_eps, as the converter writes it.
    if let Some(i) = v.iter().position(|(k, _)| *k == "attention.layer_norm_epsilon") {
        v[i].0 = "attention.layer_norm_rms_epsilon";
    }
    let p = rope_params(c);
    let f = p.get("partial_rotary_factor").and_then(Json::as_f64).unwrap_or(1.0);
    let hs = int(c, &["hidden_size"])? / int(c, &["num_attention_heads"])?.max(1);
    v.push(("rope.dimension_count", Value::U32((f * hs as f64) as u32)));
    Ok(prefixed("exaone", v))
}

/// `phi3.*`: Phi3MiniModel's own list.
pub fn phi3_hparams(c: &Json) -> Result<Vec<(String, Value)>> {
    let p = rope_params(c);
    let embd = int(c, &["hidden_size"])?;
    let heads = int(c, &["num_attention_heads"])?;
    let rot = p.get("partial_rotary_factor").and_then(Json::as_f64).unwrap_or(1.0);
    let orig = p.get("original_max_position_embeddings").and_then(Json::as_f64).context("config.json has no original_max_position_embeddings")?;
    let fr = full_rope(&p);
    let v = vec![
        ("context_length", Value::U32(int(c, &["n_positions", "max_position_embeddings"])?)),
        ("rope.scaling.original_context_length", Value::U32(orig as u32)),
        ("embedding_length", Value::U32(embd)),
        ("feed_forward_length", Value::U32(int(c, &["intermediate_size"])?)),
        ("block_count", Value::U32(int(c, &["num_hidden_layers"])?)),
        ("attention.head_count", Value::U32(heads)),
        ("attention.head_count_kv", Value::U32(int(c, &["num_key_value_heads"])?)),
        ("attention.layer_norm_rms_epsilon", f32v(num(c, &["rms_norm_eps"]).context("config.json has no rms_norm_eps")?)),
        ("rope.dimension_count", Value::U32(((rot * embd as f64) as u32) / heads.max(1))),
        ("rope.freq_base", f32v(fr.get("rope_theta").and_then(Json::as_f64).context("config.json has no rope_theta")?)),
        ("attention.sliding_window", Value::U32(num(c, &["sliding_window"]).map_or(0, |x| x as u32))),
    ];
    let mut v = v;
    if let Some(a) = phi3_attn_factor(c, &p)? {
        v.push(("rope.scaling.attn_factor", f32v(a)));
    }
    Ok(prefixed("phi3", v))
}

/// Phi-3 long-context: the attention factor the converter writes with the factor tensors.
fn phi3_attn_factor(c: &Json, p: &Json) -> Result<Option<f64>> {
    if p.get("long_factor").and_then(Json::as_array).is_none_or(|a| a.is_empty()) {
        return Ok(None);
    }
    let max = num(c, &["n_positions", "max_position_embeddings"]).context("config.json has no max_position_embeddings")?;
    let orig = p.get("original_max_position_embeddings").and_then(Json::as_f64).context("no original_max_position_embeddings")?;
    let scale = max / orig;
    let t = p.get("rope_type").or_else(|| p.get("type")).and_then(Json::as_str).unwrap_or("").to_lowercase();
    Ok(Some(match t.as_str() {
        "su" | "longrope" => if scale > 1.0 { (1.0 + scale.ln() / orig.ln()).sqrt() } else { 1.0 },
        "yarn" => if scale > 1.0 { 0.1 * scale.ln() + 1.0 } else { 1.0 },
        other => bail!("Phi-3 rope_type {other:?} with long/short factors: the converter knows longrope and yarn"),
    }))
}

/// `rope_factors_long` / `rope_factors_short` of a long-context Phi-3.
pub fn phi3_rope_factors(c: &Json) -> Result<Vec<(String, Vec<f32>)>> {
    let p = rope_params(c);
    let get = |k: &str| p.get(k).and_then(Json::as_array).map(|a| a.iter().map(|x| x.as_f64().unwrap_or(f64::NAN) as f32).collect::<Vec<f32>>());
    match (get("long_factor"), get("short_factor")) {
        (Some(l), Some(s)) if !l.is_empty() => {
            let embd = int(c, &["hidden_size"])?;
            let rot = p.get("partial_rotary_factor").and_then(Json::as_f64).unwrap_or(1.0);
            let dims = ((rot * embd as f64) as u32 / int(c, &["num_attention_heads"])?.max(1)) as usize;
            ensure!(l.len() == s.len() && 2 * l.len() == dims, "rope long/short factors of {} and {} values; {dims} rope dimensions need {}", l.len(), s.len(), dims / 2);
            Ok(vec![("rope_factors_long.weight".into(), l), ("rope_factors_short.weight".into(), s)])
        }
        _ => Ok(vec![]),
    }
}

/// `gptneox.*`: GPTNeoXModel's own list (no rope base: llama.cpp's default 10000 is the
/// checkpoints'; another base is written as `rope.freq_base`, which llama.cpp reads).
pub fn gptneox_hparams(c: &Json) -> Result<Vec<(String, Value)>> {
    let p = rope_params(c);
    let embd = int(c, &["hidden_size"])?;
    let heads = int(c, &["num_attention_heads"])?;
    let pct = num(c, &["rotary_pct"]).or_else(|| p.get("partial_rotary_factor").and_then(Json::as_f64)).unwrap_or(1.0);
    let mut v = vec![
        ("context_length", Value::U32(int(c, &["max_position_embeddings"])?)),
        ("embedding_length", Value::U32(embd)),
        ("block_count", Value::U32(int(c, &["num_hidden_layers"])?)),
        ("feed_forward_length", Value::U32(int(c, &["intermediate_size"])?)),
        ("rope.dimension_count", Value::U32((pct * (embd / heads.max(1)) as f64) as u32)),
        ("attention.head_count", Value::U32(heads)),
        ("use_parallel_residual", Value::Bool(c.get("use_parallel_residual").and_then(Json::as_bool).unwrap_or(true))),
        ("attention.layer_norm_epsilon", f32v(num(c, &["layer_norm_eps"]).context("config.json has no layer_norm_eps")?)),
    ];
    if let Some(t) = full_rope(&p).get("rope_theta").and_then(Json::as_f64).filter(|t| *t != 10000.0) {
        v.push(("rope.freq_base", f32v(t)));
    }
    if let Some(t) = full_rope(&p).get("rope_type").and_then(Json::as_str).filter(|t| *t != "default") {
        bail!("rope_type {t:?}: llama.cpp's gptneox runs plain RoPE only")
    }
    Ok(prefixed("gptneox", v))
}

/// Llama 3's rope scaling as the `rope_freqs` tensor (`LlamaModel.generate_extra_tensors`):
/// one factor per rotated pair, computed in f32 as torch does.
pub fn llama3_rope_freqs(c: &Json) -> Result<Vec<(String, Vec<f32>)>> {
    let p = rope_params(c);
    let fr = full_rope(&p);
    if !fr.get("rope_type").and_then(Json::as_str).is_some_and(|t| t.eq_ignore_ascii_case("llama3")) {
        return Ok(vec![]);
    }
    let g = |k: &str, d: f64| fr.get(k).and_then(Json::as_f64).unwrap_or(d);
    let base = g("rope_theta", 10000.0) as f32;
    let dim = head_size(c)? as usize;
    ensure!(dim <= 1 << 16, "head_dim {dim}: not a model llama.cpp runs");
    let (factor, low, high, old) = (g("factor", 8.0), g("low_freq_factor", 1.0), g("high_freq_factor", 4.0), g("original_max_position_embeddings", 8192.0));
    let (low_wavelen, high_wavelen) = (old / low, old / high);
    let f = (0..dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0f32 / base.powf(i as f32 / dim as f32);
            let wavelen = (2.0 * std::f64::consts::PI) as f32 / freq;
            if (wavelen as f64) < high_wavelen {
                1.0
            } else if wavelen as f64 > low_wavelen {
                factor as f32
            } else {
                let smooth = (old as f32 / wavelen - low as f32) / (high as f32 - low as f32);
                1.0 / ((1.0 - smooth) / factor as f32 + smooth)
            }
        })
        .collect();
    Ok(vec![("rope_freqs.weight".into(), f)])
}

/// `gpt2.*`: GPT2Model.set_gguf_parameters (context from n_ctx, else n_positions; the MLP
/// width from n_inner, which the converter writes as 4 * n_embd whatever n_inner says).
pub fn gpt2_hparams(c: &Json) -> Result<Vec<(String, Value)>> {
    let embd = int(c, &["n_embd"])?;
    let v = vec![
        ("block_count", Value::U32(int(c, &["n_layer"])?)),
        ("context_length", Value::U32(int(c, &["n_ctx", "n_positions"])?)),
        ("embedding_length", Value::U32(embd)),
        ("feed_forward_length", Value::U32(num(c, &["n_inner"]).map_or(4 * embd, |x| x as u32))),
        ("attention.head_count", Value::U32(int(c, &["n_head"])?)),
        ("attention.layer_norm_epsilon", Value::F32(num(c, &["layer_norm_epsilon"]).unwrap_or(1e-5) as f32)),
    ];
    Ok(v.into_iter().map(|(k, x)| (format!("gpt2.{k}"), x)).collect())
}

