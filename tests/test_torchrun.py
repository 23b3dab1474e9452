"""The SPMD path: torchrun launches the ranks, every rank builds LLM and gets the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

import parallax

HERE = os.path.dirname(__file__)


# every LLM of this module closed, none of its processes may be alive (conftest.py)
pytestmark = pytest.mark.usefixtures("no_process_left_behind")


def _torchrun(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model, tp, pp", [("tiny_llama", 2, 1), ("tiny_qwen2", 1, 2),
                                           ("tiny_llama", 2, 2),
                                           pytest.param("smollm2", 2, 1, marks=pytest.mark.slow)])
def test_torchrun_ranks_agree_with_one_process(request, tmp_path, model, tp, pp):
    path = request.getfixturevalue(model)
    r = _torchrun(tp * pp, os.path.join(HERE, "torchrun_script.py"), path, str(tp), str(pp),
                  str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.load(open(tmp_path / f"rank{i}.json")) for i in range(tp * pp)]
    common = [res["common"] for res in results]
    assert all(c == common[0] for c in common), "ranks disagree"
    driver = (pp - 1) * tp
    own = results[driver]["own"]
    kw = dict(max_new_tokens=12, ignore_eos=True, chat=False)
    with parallax.LLM(path) as one:
        prompts = [[5, 6, 7, 8], [9, 10]] if one.tokenizer is None else ["Water boils at", "Hi"]
        ref = one.generate(prompts, **kw)
        alone = [one.generate([p], **own["kw"])[0].token_ids for p in own["prompts"]]
    assert common[0]["tokens"] == [o.token_ids for o in ref]
    assert common[0]["streamed"] == ref[0].text
    assert common[0]["memory_ranks"] == common[0]["after_submit_memory_ranks"] == \
        list(range(tp * pp))
    # submit() on the driver rank, from threads at staggered times: each request's tokens
    # equal it alone, with up to pp steps in flight; the other ranks are refused, naming the
    # driver rank.
    assert own["submitted"] == alone
    assert own["most_steps_in_flight"] == pp
    assert own["kv_cache_usage"] == 0
    assert own["after_close"] == "EngineDeadError"   # closed mid-way; every rank exited
    for rank, res in enumerate(results):
        if rank != driver:
            assert f"only the driver rank (rank {driver})" in res["own"]["submit_error"]


@pytest.mark.timeout(120)
def test_torchrun_world_size_mismatch_is_a_layout_error(tiny_llama, tmp_path):
    """tp*pp = 4 on 2 launched ranks: every rank raises LayoutError at once ("launch with
    --nproc-per-node 4 or change tp/pp"), not after the rendezvous timeout.

    ParallelContext.initialize compares tp*pp with the launcher's WORLD_SIZE before it joins
    the process group: init_process_group(world_size=tp*pp) over env:// would wait out
    timeout_s for ranks that never come and end in a raw DistStoreError."""
    timeout_s = 10
    r = _torchrun(2, os.path.join(HERE, "torchrun_script.py"), tiny_llama, "2", "2",
                  str(tmp_path), str(timeout_s), timeout=90)
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.load(open(tmp_path / f"rank{i}.json")) for i in range(2)]
    for res in results:
        assert res.get("error") == "LayoutError" and "started 2 ranks" in res["message"] \
            and res["seconds"] < timeout_s / 2, \
            f"expected an immediate LayoutError about the launched world size, got {res}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_cli_generate():
    r = _torchrun(2, "-m", "parallax", "generate", "What is the capital of France?", "--tp", "2",
                  "--max-new-tokens", "24")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("Paris") == 1, r.stdout   # printed once: by rank 0 only
