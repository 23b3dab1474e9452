"""Run by tests/test_torchrun.py under torchrun: every rank builds the same LLM (SPMD) and
writes what it got to <out>/rank<R>.json.

Usage: torchrun_script.py MODEL TP PP OUT [TIMEOUT_S]. If building the LLM raises, the rank
records the error's type and message (and how long it took) instead of results.

Every rank calls generate, stream and memory (SPMD: each gets the same result). Then the driver
rank alone submits 8 token-id prompts (``STAGGERED``) from 4 threads at staggered times (its
``submitted`` tokens, and the most steps it had in flight at once) while
the other ranks try submit (``submit_error``) and go on to memory(), which waits for the
driver's; ``with llm`` on a follower waits until the driver closes. Last, the driver closes
while 4 long requests decode (``after_close``: how the first of them ended).
"""

import json
import os
import sys
import threading
import time

import parallax
from dist_utils import count_steps_in_flight

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
kw = dict(max_new_tokens=12, ignore_eos=True, chat=False)
STAGGERED = [[(7 * i + j) % 60 + 3 for j in range(2 + 3 * i)] for i in range(8)]
STAGGERED_KW = dict(kw, max_new_tokens=24)
driver = (pp - 1) * tp
with llm:
    prompts = [[5, 6, 7, 8], [9, 10]] if llm.tokenizer is None else ["Water boils at", "Hi"]
    outs = llm.generate(prompts, **kw)
    streamed = "".join(llm.stream(prompts[0], **kw))
    result = {"tokens": [o.token_ids for o in outs], "texts": [o.text for o in outs],
              "streamed": streamed, "world": int(os.environ["WORLD_SIZE"]),
              "memory_ranks": sorted(m["rank"] for m in llm.memory())}
    own = {}
    if int(os.environ["RANK"]) == driver:
        got: dict = {}
        # Up to pp steps in flight at once: the stages work on different steps.
        in_flight = count_steps_in_flight(llm._executor.pool)

        def submit(k: int) -> None:
            for i in range(k, len(STAGGERED), 4):
                time.sleep(0.03 * i)
                handle = llm.submit(STAGGERED[i], **STAGGERED_KW)
                got[i] = [t for d in handle for t in d.token_ids]

        threads = [threading.Thread(target=submit, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        own["prompts"], own["kw"] = STAGGERED, STAGGERED_KW
        own["submitted"] = [got.get(i) for i in range(len(STAGGERED))]
        own["most_steps_in_flight"] = in_flight[1]
        own["kv_cache_usage"] = llm.stats()["kv_cache_usage"]
    else:
        try:
            llm.submit(prompts[0], **kw)
            own["submit_error"] = None
        except parallax.ParallaxError as exc:
            own["submit_error"] = str(exc)
    result["after_submit_memory_ranks"] = sorted(m["rank"] for m in llm.memory())
    result = {"common": result, "own": own}
    if int(os.environ["RANK"]) == driver:       # close with steps in flight: nothing hangs
        unfinished = [llm.submit(p, **dict(kw, max_new_tokens=200)) for p in STAGGERED[:4]]
        next(iter(unfinished[0]))
if int(os.environ["RANK"]) == driver:
    try:
        unfinished[0].result(timeout=10)
        own["after_close"] = "finished"
    except parallax.ParallaxError as exc:
        own["after_close"] = type(exc).__name__
with open(rank_file, "w") as f:
    json.dump(result, f)
