//! Every shipped config parses (with every key known) and its header shows the command.
use std::path::Path;

#[test]
fn shipped_configs_parse_and_show_their_command() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|x| x.to_str()) != Some("toml") {
            continue;
        }
        n += 1;
        let text = std::fs::read_to_string(&p).unwrap();
        let header: String = text.lines().take_while(|l| l.starts_with('#')).collect::<Vec<_>>().join("\n");
        assert!(header.contains("lorafit ") || header.contains("cargo run"), "{}: the header shows the command", p.display());
        if text.contains("[stages.dpo") {
            let (_, [sft, dpo]) = lorafit::train::pipeline::resolve_sft_dpo(&p, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", p.display())).expect("an sft -> dpo pipeline");
            assert_eq!(dpo.dpo.sft_adapter, sft.out.dir, "{}: dpo starts from the sft stage", p.display());
        } else if text.contains("[stages.") {
            let stages = lorafit::train::pipeline::stage_configs(&p, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            assert_eq!(stages[2].ppo.reward_adapter, format!("{}/rm", Path::new(&stages[0].out.dir).parent().unwrap().display()));
        } else {
            lorafit::train::config::TrainConfig::load(Some(&p), &[]).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
        }
    }
    assert!(n >= 5, "configs found: {n}");
}
