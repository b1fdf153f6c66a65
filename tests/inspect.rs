//! `lorafit inspect` tells what an adapter or model folder is and what it was made from.
mod common;

use common::fixture;

fn inspect(path: &std::path::Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lorafit")).arg("inspect").arg(path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn describes_adapters_and_models() {
    let a = inspect(&fixture("gpt2-a").join("adapter"));
    for want in ["base model:     tests/fixtures/gpt2-a", "[\"c_attn\",\"c_proj\",\"c_fc\"]", "rank r:         4", "scaling 2.0000", "parameters:     4096"] {
        assert!(a.contains(want), "missing {want:?} in\n{a}");
    }
    let rm = inspect(&fixture("rm-gpt2-a"));
    assert!(rm.contains("SEQ_CLS") && rm.contains("base_model.model.score.weight"), "{rm}");
    let m = inspect(&fixture("llama-b"));
    assert!(m.contains("LlamaForCausalLM") && m.contains("3 layers") && m.contains("not a lorafit merge"), "{m}");
}
