"""Chat-template rendering + tokenization throughput (issue 13): lorafit vs transformers.

N conversations (seeded; 1-4 turns, half with a system message, English and Korean words, mean
~600 tokens) rendered through Qwen3's real chat template and tokenized with a 50k byte-level BPE
(GPT-2's tokenizer.json from ../shared/assets plus Qwen's <|im_start|> / <|im_end|> / <think>
tokens; the real Qwen3 tokenizer is on the hub, which this machine cannot reach).

- lorafit: `lorafit bench render --model DIR --data F --json`: streamed in batches of 4096 rows
  over rayon's threads (RAYON_NUM_THREADS); each row rendered, its assistant spans found, tokenized,
  masked (the mask is extra work transformers does not do here).
- transformers: `datasets.load_dataset("json", ...)` then `.map(apply_chat_template(tokenize=True),
  num_proc=THREADS)`, timed separately (load = JSON -> Arrow cache).

    RAYON_NUM_THREADS=2 /root/venv-ref/bin/python scripts/bench/chat_render.py --rows 100000 --lorafit target/release/lorafit
"""
import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EN = ("the model learns a small low rank update for each layer while the base weights stay frozen and the optimizer "
      "keeps only adapter state so memory stays low on one consumer card people share datasets of conversations "
      "with system prompts and many turns about cooking travel code music science history sports weather").split()
KO = "오늘 날씨 모델 학습 데이터 대화 요리 여행 음악 과학 역사 운동 한국어 질문 대답 친절하게 짧게 설명 예시 문장 사람".split()


def words(rng, n):
    return " ".join(rng.choice(KO) if rng.random() < 0.25 else rng.choice(EN) for _ in range(n))


def make_tokenizer(out: Path):
    from tokenizers import AddedToken, Tokenizer
    tok = Tokenizer.from_file(str(ROOT.parent / "shared/assets/gpt2/tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<|im_start|>", "<|im_end|>"]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ["<think>", "</think>"]])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    template = (ROOT / "tests/fixtures/chat/templates/qwen3.jinja").read_text()
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    (out / "config.json").write_text(json.dumps({"eos_token_id": tok.token_to_id("<|im_end|>")}))


def make_data(path: Path, rows: int, words_per_row: int):
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(rows):
            turns = rng.randint(1, 4)
            msgs = [{"role": "system", "content": words(rng, 12)}] if rng.random() < 0.5 else []
            per = max(2, words_per_row // (2 * turns))
            for _ in range(turns):
                msgs.append({"role": "user", "content": words(rng, rng.randint(per // 2, per * 3 // 2))})
                msgs.append({"role": "assistant", "content": words(rng, rng.randint(per // 2, per * 3 // 2))})
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")


def cpu():
    """User + system CPU seconds of this process and its finished children (datasets' workers)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100000)
    ap.add_argument("--lorafit", default=str(ROOT / "target/release/lorafit"))
    ap.add_argument("--out", default=str(ROOT / "target/bench/chat_render"))
    ap.add_argument("--skip-transformers", action="store_true")
    a = ap.parse_args()
    threads = int(os.environ.get("RAYON_NUM_THREADS", "2"))
    out = Path(a.out)
    tokdir = out / "qwen3-gpt2-tok"
    make_tokenizer(tokdir)
    data = out / f"chat_{a.rows}.jsonl"
    if not data.exists():
        make_data(data, a.rows, words_per_row=245)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokdir)

    t = time.time()
    r = subprocess.run([a.lorafit, "bench", "render", "--model", str(tokdir), "--data", str(data), "--json"], capture_output=True, text=True,
                       env={**os.environ, "RAYON_NUM_THREADS": str(threads)})
    if r.returncode != 0:
        sys.exit(r.stderr)
    lf = json.loads(r.stdout)
    lf["wall_s"] = time.time() - t
    print(json.dumps({"tool": "lorafit", **lf}))
    if a.skip_transformers:
        return
    import datasets
    datasets.disable_progress_bars()
    t = time.time()
    ds = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(out / "hf_cache"))
    load_s = time.time() - t
    t = time.time()
    cpu0 = cpu()
    mapped = ds.map(lambda ex: {"input_ids": tok.apply_chat_template(ex["messages"], tokenize=True, return_dict=True)["input_ids"]},
                    num_proc=threads, remove_columns=["messages"], load_from_cache_file=False)
    map_s = time.time() - t
    map_cpu = cpu() - cpu0
    n_tok = sum(len(x) for x in mapped["input_ids"])
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024
    print(json.dumps({"tool": "transformers", "rows": len(mapped), "tokens": n_tok, "threads": threads, "load_s": load_s, "map_s": map_s, "map_cpu_s": map_cpu,
                      "tokens_per_s": n_tok / map_s, "peak_rss_bytes_largest_process": rss}))
    assert n_tok == lf["tokens"], f"token counts differ: transformers {n_tok}, lorafit {lf['tokens']}"


if __name__ == "__main__":
    main()
