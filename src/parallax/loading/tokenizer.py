"""Tokenizer: text <-> token ids, chat templates, and streaming decode.

Design choices:
- A thin wrapper over ``tokenizers.Tokenizer`` (Rust), built from a ``tokenizer.json``
  (``from_dir``) or rebuilt from GGUF metadata (``from_gguf_metadata``). No transformers.
- From GGUF, a ``gpt2`` vocabulary becomes a byte-level BPE; ``tokenizer.ggml.pre`` picks
  the split regex as llama.cpp does. Control tokens (type 3) become special added tokens,
  user-defined ones (type 4) plain added tokens that are still matched whole -- the same
  choice as transformers' GGUF loader, which is the oracle in the tests.
- BOS/EOS insertion lives in the backend's post-processor, so ``add_special_tokens``
  means one thing whichever way the tokenizer was built.
- Chat templates render in a sandboxed jinja2 environment set up like HF's
  (``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, ``tojson``, ``strftime_now``).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterable

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from ..errors import CheckpointError, PromptError

# llama.cpp token types (llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# `tokenizer.ggml.pre` -> regexes applied before GPT-2's own (None: GPT-2's regex alone).
# "smollm"/"starcoder": every digit on its own, then GPT-2's regex (llama-vocab.cpp).
_PRE_SPLITS: dict[str, tuple[str, bool]] = {   # name -> (regex, then GPT-2 regex too)
    "smollm": (r"\p{N}", True),
    "starcoder": (r"\p{N}", True),
    "refact": (r"\p{N}", True),
    "llama-bpe": (_LLAMA3_SPLIT, False),
    "llama3": (_LLAMA3_SPLIT, False),
    "llama-v3": (_LLAMA3_SPLIT, False),
    "smaug-bpe": (_LLAMA3_SPLIT, False),
    "dbrx": (_LLAMA3_SPLIT, False),
    "qwen2": (_QWEN2_SPLIT, False),
}


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    split = _PRE_SPLITS.get(pre or "")
    if split is None:                       # "gpt2", "default" and anything unknown
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    regex, gpt2_after = split
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_after),
    ])


def _template_processor(bos: str | None, bos_id: int | None, eos: str | None,
                        eos_id: int | None) -> processors.TemplateProcessing:
    pre = [bos] if bos is not None else []
    post = [eos] if eos is not None else []
    special = [(t, i) for t, i in ((bos, bos_id), (eos, eos_id)) if t is not None]
    return processors.TemplateProcessing(
        single=" ".join(pre + ["$A:0"] + post),
        pair=" ".join(pre + ["$A:0"] + post + pre + ["$B:1"] + post),
        special_tokens=special)


def _token_str(tok: Any) -> str | None:
    """A special-token entry of tokenizer_config.json (str or AddedToken dict) as text."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


class Tokenizer:
    """Token ids <-> text for one model, plus its chat template."""

    def __init__(self, backend: _Backend, *, bos_token: str | None = None,
                 eos_tokens: Iterable[str] = (), chat_template: str | None = None,
                 special_tokens: dict[str, str] | None = None) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.bos_token_id: int | None = None if bos_token is None else backend.token_to_id(bos_token)
        eos_tokens = [t for t in eos_tokens if t is not None]
        self.eos_token = eos_tokens[0] if eos_tokens else None
        ids = [backend.token_to_id(t) for t in eos_tokens]
        self.eos_token_ids: list[int] = list(dict.fromkeys(i for i in ids if i is not None))
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self._compiled = None

    # ------------------------------------------------------------------ basics
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text for ``messages`` ([{"role": ..., "content": ...}, ...])."""
        if not self.chat_template:
            raise CheckpointError("this tokenizer has no chat template; pass chat=False "
                                  "or format the prompt yourself")
        import jinja2
        from jinja2.sandbox import SecurityError
        try:
            if self._compiled is None:
                self._compiled = _jinja_env().from_string(self.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise CheckpointError(f"the model's chat template does not parse ({e}); pass "
                                  f"chat=False and format the prompt yourself") from None
        variables = {**self.special_tokens, "bos_token": self.bos_token or "",
                     "eos_token": self.eos_token or ""}
        variables.update(kwargs)
        try:
            return self._compiled.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except SecurityError as e:
            raise CheckpointError(f"the model's chat template did something the sandbox forbids "
                                  f"({e}); pass chat=False and format the prompt yourself") from None
        except jinja2.TemplateError as e:   # raise_exception(...) or an undefined value
            raise PromptError(f"the model's chat template refused these messages: {e.message}") from None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer | None":
        """From a HF folder's tokenizer.json (+ tokenizer_config.json); None without one."""
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            return None
        try:
            backend = _Backend.from_file(tj)
        except Exception as e:      # tokenizers raises plain Exception subclasses
            raise CheckpointError(f"cannot parse {tj}: {e}") from None
        cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        special = {k: _token_str(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token",
                                                       "pad_token")}
        special = {k: v for k, v in special.items() if v is not None}
        bos, eos = special.get("bos_token"), special.get("eos_token")

        eos_tokens = [eos] if eos else []
        gen = _read_json(os.path.join(path, "generation_config.json"))
        gen_eos = gen.get("eos_token_id")
        for i in [gen_eos] if isinstance(gen_eos, int) else (gen_eos or []):
            tok = backend.id_to_token(int(i))
            if tok is not None:
                eos_tokens.append(tok)

        # Honour explicit add_bos/add_eos flags when tokenizer.json's post-processor differs.
        add_bos, add_eos = cfg.get("add_bos_token"), cfg.get("add_eos_token")
        if add_bos is not None or add_eos is not None:
            probe = backend.encode("a", add_special_tokens=True).ids
            plain = backend.encode("a", add_special_tokens=False).ids
            has_bos = bos is not None and len(probe) > len(plain) and probe[0] == backend.token_to_id(bos)
            has_eos = eos is not None and len(probe) > len(plain) and probe[-1] == backend.token_to_id(eos)
            want_bos = has_bos if add_bos is None else bool(add_bos) and bos is not None
            want_eos = has_eos if add_eos is None else bool(add_eos) and eos is not None
            if (want_bos, want_eos) != (has_bos, has_eos):
                backend.post_processor = _template_processor(
                    bos if want_bos else None, backend.token_to_id(bos) if want_bos else None,
                    eos if want_eos else None, backend.token_to_id(eos) if want_eos else None)

        template = cfg.get("chat_template")
        jinja = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                template = f.read()
        if isinstance(template, list):      # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        return cls(backend, bos_token=bos, eos_tokens=eos_tokens, chat_template=template,
                   special_tokens=special)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "Tokenizer":
        """Rebuild the tokenizer llama.cpp describes in a GGUF's ``tokenizer.*`` metadata."""
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise CheckpointError(
                f"GGUF tokenizer model {kind!r} is not supported; parallax rebuilds byte-level "
                f"BPE ('gpt2') vocabularies only -- use the model's tokenizer.json instead")
        tokens = meta.get("tokenizer.ggml.tokens")
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens or ())
        merges = meta.get("tokenizer.ggml.merges", [])
        if not (_list_of(tokens, str) and _list_of(types, int) and _list_of(merges, str)
                and len(types) == len(tokens) and all(" " in m for m in merges)):
            raise CheckpointError("the GGUF tokenizer metadata is malformed (tokenizer.ggml.tokens, "
                                  "token_type and merges must be lists of strings / ints / 'a b' "
                                  "pairs of one length); re-convert the file")
        for key in ("bos_token_id", "eos_token_id", "eot_token_id", "unknown_token_id",
                    "padding_token_id"):
            if not isinstance(meta.get(f"tokenizer.ggml.{key}", 0), int):
                raise CheckpointError(f"GGUF tokenizer.ggml.{key} must be an integer")
        for key in ("tokenizer.ggml.pre", "tokenizer.chat_template"):
            if not isinstance(meta.get(key, ""), str):
                raise CheckpointError(f"GGUF {key} must be a string")
        merges = [tuple(m.split(" ", 1)) for m in merges]

        alphabet = _byte_alphabet()
        letters = set(alphabet.values())
        vocab = {}
        for i, tok in enumerate(tokens):
            if not set(tok) <= letters:     # stored as raw text: spell its bytes
                tok = "".join(alphabet[b] for b in tok.encode("utf-8"))
            vocab.setdefault(tok, i)
        try:
            backend = _Backend(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
        except Exception as e:    # tokenizers raises plain Exception for merges of unknown tokens
            raise CheckpointError(f"the GGUF tokenizer cannot be rebuilt ({e}); re-convert the file") from None
        backend.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
        backend.decoder = decoders.ByteLevel()

        # Control tokens spelled outside the byte alphabet are llama.cpp mislabels: skip them.
        control = [AddedToken(t, special=True, normalized=False)
                   for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= letters]
        backend.add_special_tokens(control)
        user = [AddedToken(t, special=False, normalized=False)
                for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab]
        backend.add_tokens(user)

        def tok_of(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

        bos, eos = tok_of("bos_token_id"), tok_of("eos_token_id")
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
        if add_bos or add_eos:
            backend.post_processor = _template_processor(
                bos if add_bos else None, vocab.get(bos) if add_bos else None,
                eos if add_eos else None, vocab.get(eos) if add_eos else None)
        special = {k: v for k, v in (("bos_token", bos), ("eos_token", eos),
                                     ("unk_token", tok_of("unknown_token_id")),
                                     ("pad_token", tok_of("padding_token_id"))) if v is not None}
        return cls(backend, bos_token=bos, eos_tokens=[eos, tok_of("eot_token_id")],
                   chat_template=meta.get("tokenizer.chat_template"), special_tokens=special)


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces, never splitting a UTF-8 character.

    Byte-level tokens can end mid-character; decoding then yields U+FFFD. ``push`` holds
    such text back until a later token completes it; ``flush`` returns whatever is left.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0     # start of the window re-decoded for context
        self._read = 0       # end of the ids already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        before = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        before = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return now[len(before):]


# ---------------------------------------------------------------------- helpers
def _list_of(x: Any, kind: type) -> bool:
    return isinstance(x, list) and all(isinstance(v, kind) and not isinstance(v, bool) for v in x)


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


@lru_cache(maxsize=1)
def _jinja_env():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (HF's assistant-mask tag): render the body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env
