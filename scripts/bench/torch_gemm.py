#!/usr/bin/env python3
"""torch's f32 CPU matmul throughput at one shape: the machine's GEMM ceiling for docs/BENCHMARKS.md
(the counterpart of `lorafit bench gemm`, which measures candle's). Two layouts, as lorafit's:
`nn` = (M,K) @ (K,N), both contiguous; `nt` = (M,K) @ (N,K).T (a transposed view, as a tied LM head).
2 warm-up calls, then --repeats timed ones; one JSON line per layout with the keys of
`lorafit bench gemm --json`.

Usage: torch_gemm.py [--gemm 2048x768x3072] [--repeats 10] [--threads 2]
"""
import argparse
import json
import time


def measure(m: int, k: int, n: int, repeats: int, threads: int) -> list:
    """One dict per layout (nn, nt) with the keys of `lorafit bench gemm --json` (also used by
    torch_profile_sft.py for the GEMM peak of its run)."""
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(m, k, generator=g)
    out = []
    for layout, rhs in (("nn", torch.randn(k, n, generator=g)), ("nt", torch.randn(n, k, generator=g).t())):
        times = []
        for i in range(max(1, repeats) + 2):
            t0 = time.perf_counter()
            c = x @ rhs
            dt = time.perf_counter() - t0
            del c
            if i >= 2:
                times.append(dt)
        times.sort()
        flop = 2.0 * m * k * n
        med, best = times[len(times) // 2], times[0]
        out.append({"tool": "torch", "m": m, "k": k, "n": n, "layout": layout, "s_median": med, "s_min": best,
                    "gflops_median": flop / med / 1e9, "gflops_best": flop / best / 1e9,
                    "threads": threads, "torch": torch.__version__})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gemm", default="2048x768x3072")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    m, k, n = (int(x) for x in a.gemm.split("x"))
    for r in measure(m, k, n, a.repeats, a.threads):
        print(json.dumps(r))


if __name__ == "__main__":
    main()
