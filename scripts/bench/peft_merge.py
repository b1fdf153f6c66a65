#!/usr/bin/env python3
"""The PEFT side of scripts/bench/merge.sh (see docs/BENCHMARKS.md): what `lorafit merge --dtype f16`
does, done the usual PEFT way, in one fresh process.

  base   = GPT2LMHeadModel.from_pretrained(--model, dtype=torch.float32)
  model  = PeftModel.from_pretrained(base, --adapter)
  merged = model.merge_and_unload()
  merged.to(torch.float16).save_pretrained(--out)      # safetensors, transformers' default
  fsync of the files written                            # lorafit merge fsyncs its output too

Prints one JSON line:
  seconds                    from the start of the load to the end of the fsync (imports
                             excluded; the shell times the whole process as well)
  load_s, adapter_s, merge_s, cast_s, save_s, fsync_s   the phases
  peak_rss_before_load_bytes ru_maxrss after `import torch, transformers, peft` (the runtime)
  peak_rss_after_load_bytes  ru_maxrss after the base and the adapter are loaded
  peak_rss_bytes             ru_maxrss at the end
  import_s                   time of the imports

Usage: peft_merge.py --model DIR --adapter ADAPTER --out DIR [--threads 2]
"""
import argparse
import json
import os
import resource
import time

T0 = time.perf_counter()


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Hugging Face GPT-2 folder (f32)")
    ap.add_argument("--adapter", required=True, help="a PEFT LoRA adapter folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import peft
    import torch
    import transformers
    from peft import PeftModel
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(a.threads)
    import_s = time.perf_counter() - T0
    rss_import = maxrss_bytes()

    t = [time.perf_counter()]
    base = GPT2LMHeadModel.from_pretrained(a.model, dtype=torch.float32)
    t.append(time.perf_counter())
    model = PeftModel.from_pretrained(base, a.adapter)
    t.append(time.perf_counter())
    rss_load = maxrss_bytes()
    merged = model.merge_and_unload()
    t.append(time.perf_counter())
    merged = merged.to(torch.float16)
    t.append(time.perf_counter())
    merged.save_pretrained(a.out)
    t.append(time.perf_counter())
    for f in sorted(os.listdir(a.out)) + ["."]:  # durable, as lorafit's output
        fd = os.open(os.path.join(a.out, f), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    t.append(time.perf_counter())
    assert next(merged.parameters()).dtype == torch.float16

    print(json.dumps({
        "tool": "peft", "seconds": t[-1] - t[0], "load_s": t[1] - t[0], "adapter_s": t[2] - t[1],
        "merge_s": t[3] - t[2], "cast_s": t[4] - t[3], "save_s": t[5] - t[4], "fsync_s": t[6] - t[5], "import_s": import_s,
        "peak_rss_before_load_bytes": rss_import, "peak_rss_after_load_bytes": rss_load,
        "peak_rss_bytes": maxrss_bytes(), "threads": a.threads, "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
    }))


if __name__ == "__main__":
    main()
