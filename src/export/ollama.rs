//! `--ollama`: a Modelfile beside the GGUF, so `ollama create NAME -f Modelfile` works.
//!
//! `FROM` names the GGUF (a LoRA GGUF becomes `ADAPTER`, over a base GGUF the user exports);
//! `TEMPLATE` is Ollama's Go-template form of the model's chat template when it is one of the
//! families Ollama ships (ChatML, Llama 3, Llama 2 / Mistral `[INST]`, Gemma, Phi-3), or of the
//! prompt template a lorafit adapter was trained with (`{prompt}` -> `{{ .Prompt }}`); `stop`
//! parameters come from the template's end markers and the tokenizer's end-of-sequence token.
//! Reference: Ollama `docs/modelfile.md`, its `template/*.gotmpl`.
use std::path::Path;

use anyhow::Result;

use super::vocab::Vocab;
use super::Format;
use crate::merge::Folded;

/// The first line of every Modelfile lorafit writes (how `--force` recognises one).
pub const MARK: &str = "# Modelfile written by lorafit export";

/// (marker in the chat template, Ollama template, stop strings)
const KNOWN: &[(&str, &str, &[&str])] = &[
    (
        "<|start_header_id|>",
        "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>",
        &["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    ),
    (
        "<|im_start|>",
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n{{ .Response }}<|im_end|>\n",
        &["<|im_start|>", "<|im_end|>"],
    ),
    (
        "<start_of_turn>",
        "<start_of_turn>user\n{{ if .System }}{{ .System }} {{ end }}{{ .Prompt }}<end_of_turn>\n<start_of_turn>model\n{{ .Response }}<end_of_turn>\n",
        &["<start_of_turn>", "<end_of_turn>"],
    ),
    (
        "<|assistant|>",
        "{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}{{ if .Prompt }}<|user|>\n{{ .Prompt }}<|end|>\n{{ end }}<|assistant|>\n{{ .Response }}<|end|>\n",
        &["<|end|>", "<|user|>", "<|assistant|>"],
    ),
    (
        "[INST]",
        "[INST] {{ if .System }}<<SYS>>{{ .System }}<</SYS>>\n\n{{ end }}{{ .Prompt }} [/INST]",
        &["[INST]", "[/INST]"],
    ),
];

/// Ollama's template and stops for a Hugging Face chat template it knows.
pub fn known_template(chat_template: &str) -> Option<(&'static str, &'static [&'static str])> {
    KNOWN.iter().find(|(m, _, _)| chat_template.contains(m)).map(|(_, t, s)| (*t, *s))
}

/// The prompt template the last lorafit-trained adapter used (its lorafit.json template record;
/// for older folders, its run's config.toml). None when it trained through a chat template.
fn lorafit_template(folded: &Folded) -> Option<String> {
    folded.record.iter().rev().find_map(|r| {
        let dir = Path::new(r["path"].as_str()?);
        if let Ok(Some(rec)) = crate::render::TemplateRecord::read(dir) {
            return rec.prompt_template;
        }
        let cfg: crate::train::config::TrainConfig = toml::from_str(&std::fs::read_to_string(dir.join("config.toml")).ok()?).ok()?;
        Some(crate::template::Template::or_default(&cfg.data.template).ok()?.text().to_string())
    })
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The Modelfile for the GGUF at `gguf` (notes say what it could not fill in).
pub fn modelfile(gguf: &Path, format: Format, folded: &Folded, vocab: Option<&Vocab>, notes: &mut Vec<String>) -> Result<String> {
    let file = format!("./{}", gguf.file_name().unwrap_or_default().to_string_lossy());
    let built;
    let vocab = match vocab {
        Some(v) => Some(v),
        None => {
            let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&folded.files.config)?)?;
            let n = config["vocab_size"].as_u64().unwrap_or(0) as usize;
            built = super::vocab::build(&folded.files.dir, &folded.files.tokenizer, &config, n).ok();
            built.as_ref()
        }
    };
    let mut s = format!("{MARK} (lorafit {}): ollama create NAME -f Modelfile\n", env!("CARGO_PKG_VERSION"));
    match format {
        Format::Gguf => s.push_str(&format!("FROM {file}\n")),
        Format::GgufLora => {
            s.push_str("# The base model as GGUF, e.g. `lorafit export --model BASE --format gguf --quant f16 --out base.gguf`\n");
            s.push_str("FROM ./base.gguf\n");
            s.push_str(&format!("ADAPTER {file}\n"));
        }
    }
    let mut stops: Vec<String> = vec![];
    let chat = vocab.and_then(|v| v.chat_template.as_deref());
    match (chat.and_then(known_template), chat, lorafit_template(folded)) {
        (Some((t, st)), _, _) => {
            s.push_str(&format!("TEMPLATE \"\"\"{t}\"\"\"\n"));
            stops.extend(st.iter().map(|x| x.to_string()));
        }
        (None, _, Some(t)) => {
            let t = t.replace("{{", "{{\"{{\"}}").replace("{prompt}", "{{ .Prompt }}");
            s.push_str(&format!("TEMPLATE \"\"\"{t}{{{{ .Response }}}}\"\"\"\n"));
        }
        (None, Some(_), None) => {
            notes.push("Modelfile: the chat template is not one Ollama ships, so no TEMPLATE was written (Ollama reads tokenizer.chat_template from the GGUF where it can)".into());
        }
        (None, None, None) => notes.push("Modelfile: the model has no chat template and no lorafit prompt template: no TEMPLATE written".into()),
    }
    for e in vocab.map(|v| v.stops.clone()).unwrap_or_default() {
        if !stops.contains(&e) {
            stops.push(e);
        }
    }
    for st in stops {
        s.push_str(&format!("PARAMETER stop {}\n", quote(&st)));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_chat_templates_map_to_ollamas() {
        let llama3 = "{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>{% endfor %}";
        let (t, stops) = known_template(llama3).unwrap();
        assert!(t.contains("{{ .Prompt }}") && stops.contains(&"<|eot_id|>"));
        let chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}";
        assert!(known_template(chatml).unwrap().0.starts_with("{{ if .System }}<|im_start|>system"));
        assert!(known_template("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}").is_none());
    }
}
