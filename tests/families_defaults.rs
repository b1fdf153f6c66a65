//! Keys a config.json may leave out take transformers' per-family defaults, not a guess:
//! `num_key_value_heads` absent is 8 for Mistral and EXAONE 3.5, 32 for Qwen2/Qwen3/EXAONE 4, 4
//! for Gemma 2/3, and the number of heads for Llama and Phi-3 (transformers 5.24's config
//! classes: `AutoConfig.for_model(t, num_attention_heads=16).num_key_value_heads`).
use lorafit::model::Arch;

fn kv_heads(model_type: &str, heads: usize) -> anyhow::Result<usize> {
    let mut cfg = serde_json::json!({"model_type": model_type, "hidden_size": 64 * heads, "num_attention_heads": heads,
        "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100, "head_dim": 64});
    if model_type.starts_with("gemma") {
        cfg["sliding_window"] = 16.into(); // their default layer types include local layers
    }
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("config.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    match Arch::from_file(&path)? {
        Arch::Decoder(c) => Ok(c.num_key_value_heads),
        _ => panic!("{model_type}: not the decoder"),
    }
}

#[test]
fn absent_num_key_value_heads_takes_transformers_family_default() {
    // transformers 5.24, with num_attention_heads = 64 (a multiple of every default).
    let want = [("llama", 64), ("phi3", 64), ("mistral", 8), ("exaone", 8), ("qwen2", 32), ("qwen3", 32), ("exaone4", 32),
        ("gemma2", 4), ("gemma3_text", 4)];
    for (t, kv) in want {
        assert_eq!(kv_heads(t, 64).unwrap(), kv, "{t}");
    }
    // 16 heads over Qwen2's default of 32 KV heads: transformers builds a broken model; lorafit says why.
    let err = format!("{:#}", kv_heads("qwen2", 16).unwrap_err());
    assert!(err.contains("num_key_value_heads = 32"), "{err}");
}
