"""Run by tests/test_torchrun.py under torchrun: every rank builds the same LLM (SPMD) and
writes what it got to <out>/rank<R>.json.

Usage: torchrun_script.py MODEL TP PP OUT [TIMEOUT_S]. If building the LLM raises, the rank
records the error's type and message (and how long it took) instead of results.
"""

import json
import os
import sys
import time

import parallax

model, tp, pp, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
timeout_s = float(sys.argv[5]) if len(sys.argv) > 5 else 60.0
rank_file = os.path.join(out, f"rank{os.environ['RANK']}.json")
t0 = time.monotonic()
try:
    llm = parallax.LLM(model, tp=tp, pp=pp, timeout_s=timeout_s)
except Exception as exc:
    with open(rank_file, "w") as f:
        json.dump({"error": type(exc).__name__, "message": str(exc),
                   "seconds": time.monotonic() - t0}, f)
    sys.exit(0)
with llm:
    prompts = [[5, 6, 7, 8], [9, 10]] if llm.tokenizer is None else ["Water boils at", "Hi"]
    outs = llm.generate(prompts, max_new_tokens=12, ignore_eos=True, chat=False)
    streamed = "".join(llm.stream(prompts[0], max_new_tokens=12, ignore_eos=True, chat=False))
    result = {"tokens": [o.token_ids for o in outs], "texts": [o.text for o in outs],
              "streamed": streamed, "world": int(os.environ["WORLD_SIZE"])}
with open(rank_file, "w") as f:
    json.dump(result, f)
