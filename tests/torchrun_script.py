"""Run by tests/test_torchrun.py under torchrun: every rank builds the same LLM (SPMD) and
writes what it got to <out>/rank<R>.json."""

import json
import os
import sys

import parallax

model, tp, pp, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
with parallax.LLM(model, tp=tp, pp=pp) as llm:
    prompts = [[5, 6, 7, 8], [9, 10]] if llm.tokenizer is None else ["Water boils at", "Hi"]
    outs = llm.generate(prompts, max_new_tokens=12, ignore_eos=True, chat=False)
    streamed = "".join(llm.stream(prompts[0], max_new_tokens=12, ignore_eos=True, chat=False))
    result = {"tokens": [o.token_ids for o in outs], "texts": [o.text for o in outs],
              "streamed": streamed, "world": int(os.environ["WORLD_SIZE"])}
with open(os.path.join(out, f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(result, f)
