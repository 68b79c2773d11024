"""Tokenizer and chat template, read from the model's own files.

Built on the ``tokenizers`` library only (no ``transformers`` at run time). Two sources:

* an HF directory: ``tokenizer.json`` + ``tokenizer_config.json`` (+ ``chat_template.jinja``,
  ``generation_config.json``);
* a GGUF file: vocabulary, merges and special ids from its metadata, rebuilt the way
  ``transformers`` rebuilds them (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``), so ids match
  token for token.

Chat templates render in a sandboxed jinja2 environment set up like transformers'. Streaming output
goes through :class:`IncrementalDetokenizer`, which never emits half of a multi-byte character.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE

if TYPE_CHECKING:
    from fleetserve.models.resolve import ModelFiles

# Pre-tokenizer splits for GGUF ``tokenizer.ggml.pre`` values whose merges were learned with a
# non-GPT-2 regex (copied from transformers' GGUF integration; anything else uses GPT-2's).
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral"), _LLAMA3),
    **dict.fromkeys(("midm-2.0", "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
}
_CONTROL, _USER_DEFINED = 3, 4
_GGUF_SPECIAL = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE spells every token with it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [b for b in range(256) if b not in printable]  # spelled as U+0100, U+0101, ...
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


def _token_content(value: Any) -> str | None:
    """tokenizer_config special tokens are strings or ``{"content": ...}`` dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encode/decode + chat template for one model, with the ids that end generation."""

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        extra_eos_ids: list[int] | None = None,
    ) -> None:
        self._tok = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token is not None else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token is not None else None
        self.chat_template = chat_template
        ids = ([self.eos_token_id] if self.eos_token_id is not None else []) + list(extra_eos_ids or [])
        self.eos_token_ids: list[int] = list(dict.fromkeys(ids))
        # Everything the model can emit, added tokens included (what logits are indexed by).
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> _HFTokenizer:
        """The underlying ``tokenizers.Tokenizer`` (e.g. to save it as tokenizer.json)."""
        return self._tok

    # ------------------------------------------------------------ loading

    @classmethod
    def from_model_files(cls, files: ModelFiles) -> Tokenizer:
        """Load from a resolved model, whatever its format."""
        if files.format == "gguf":
            return cls.from_gguf(files.path)
        if files.format == "hf":
            return cls.from_hf_dir(files.path)
        raise ValueError(f"unknown model format {files.format!r}; supported: 'hf', 'gguf'")

    @classmethod
    def from_hf_dir(cls, path: Path) -> Tokenizer:
        """Load ``tokenizer.json`` and the settings transformers would read next to it."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ValueError(
                f"{path} has no tokenizer.json; fleetserve needs a fast-tokenizer tokenizer.json"
            )
        backend = _HFTokenizer.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        special = {
            k: _token_content(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        present = [t for t in special.values() if t is not None and backend.token_to_id(t) is not None]
        if present:  # transformers registers these as special tokens too (so they decode/skip as such)
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in present])
        # BOS/EOS framing comes from tokenizer.json's post-processor alone: transformers 5 drops
        # tokenizer_config's add_bos_token/add_eos_token whenever a tokenizer.json exists.
        template = _read_chat_template(path, config)
        gen = _read_json(path / "generation_config.json").get("eos_token_id")
        extra = [gen] if isinstance(gen, int) else [i for i in gen or [] if isinstance(i, int)]
        return cls(backend, **special, chat_template=template, extra_eos_ids=extra)

    @classmethod
    def from_gguf(cls, path: Path, *, reader: Any = None) -> Tokenizer:
        """Rebuild the byte-level BPE tokenizer a GGUF describes, exactly as transformers does.

        Opening a GGUF takes seconds; pass the ``gguf.GGUFReader`` the weight loader already has.
        """
        if reader is None:
            from gguf import GGUFReader

            reader = GGUFReader(str(path))

        def field(key: str, default: Any = None) -> Any:
            f = reader.fields.get(key)
            return f.contents() if f is not None else default

        model = field("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"{Path(path).name}: GGUF tokenizer model {model!r} is not supported; fleetserve reads only "
                "'gpt2' (byte-level BPE) tokenizers from GGUF. Use the model's HF directory instead"
            )
        tokens: list[str] = field("tokenizer.ggml.tokens")
        types: list[int] = field("tokenizer.ggml.token_type") or []
        alphabet = _byte_alphabet()
        spelled = set(alphabet.values())
        # A token written with characters outside the byte alphabet is respelled byte by byte.
        vocab = {
            t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8")): i
            for i, t in enumerate(tokens)
        }
        merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges") or []]
        bpe = BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
        backend = _HFTokenizer(bpe)
        split = _GGUF_SPLITS.get(field("tokenizer.ggml.pre"))
        if split is None:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        backend.decoder = decoders.ByteLevel()

        def token_for(key: str) -> str | None:
            i = field(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        special = {name: token_for(key) for name, key in _GGUF_SPECIAL.items()}
        # Control tokens stay whole and are special; a "control" token spelled outside the byte
        # alphabet is a llama.cpp mislabel and is skipped (as transformers does).
        control = [t for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= spelled]
        control += [t for t in special.values() if t is not None and t in vocab]
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(control)]
        )
        user = [t for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab]
        if user:
            backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
        _set_post_processor(
            backend,
            special["bos_token"] if field("tokenizer.ggml.add_bos_token") else None,
            special["eos_token"] if field("tokenizer.ggml.add_eos_token") else None,
        )
        # llama.cpp also stops on end-of-turn / end-of-message tokens (Llama 3's <|eot_id|>, <|eom_id|>).
        extra = [i for k in ("eot", "eom") if (i := field(f"tokenizer.ggml.{k}_token_id")) is not None]
        return cls(backend, **special, chat_template=field("tokenizer.chat_template"), extra_eos_ids=extra)

    # ------------------------------------------------------------ text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        token = self._tok.id_to_token(i)
        if token is None:
            raise ValueError(f"token id {i} is out of range; valid ids are 0..{self.vocab_size - 1}")
        return token

    def incremental_detokenizer(
        self, prompt_ids: list[int], skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------ chat

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` with the model's own template (same output as transformers)."""
        if not self.chat_template:
            raise ValueError(
                "this model has no chat template; use the completions endpoint with a raw prompt, "
                "or serve a model whose tokenizer files include a chat template"
            )
        variables = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            **kwargs,
        }
        return _compile_template(self.chat_template).render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **variables
        )


class IncrementalDetokenizer:
    """Turn a stream of generated ids into text deltas (vLLM's prefix/read offset technique).

    Each push decodes a short window (a few earlier tokens + the new ones) and emits what the window
    adds beyond its already-emitted part. While the window ends with U+FFFD the tail may be an
    unfinished UTF-8 character split across byte-level tokens, so it is held back. ``flush`` emits
    what is still held at the end.
    """

    _CONTEXT = 5  # prompt tokens decoded before the first generated one (keeps leading spaces right)

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-self._CONTEXT :])
        if tokenizer.decode(self._ids, skip_special_tokens=skip_special_tokens).endswith("\ufffd"):
            # The prompt ends inside a character: generated bytes would complete it, so the deltas
            # would no longer add up to decode(generated). Start from a clean boundary instead.
            self._ids = []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""

    def push(self, new_ids: list[int]) -> str:
        """Add generated ids; return the text they finalised (possibly empty)."""
        self._ids.extend(new_ids)
        prefix, full = self._window()
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        return self._emit(full[len(prefix) :])

    def flush(self) -> str:
        """Emit whatever is held back (e.g. a final incomplete character, as U+FFFD)."""
        prefix, full = self._window()
        return self._emit(full[len(prefix) :]) if len(full) > len(prefix) else ""

    def _window(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=self._skip)
        full = decode(self._ids[self._prefix_offset :], skip_special_tokens=self._skip)
        return prefix, full

    def _emit(self, delta: str) -> str:
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if self._prefix_offset > 0:  # drop ids no window will look at again
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        self.text += delta
        return delta


# ---------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _read_chat_template(path: Path, config: dict) -> str | None:
    """``chat_template.jinja`` wins (transformers 4.5x+ saves it there), then tokenizer_config's."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template") or _read_json(path / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _set_post_processor(backend: _HFTokenizer, bos: str | None, eos: str | None) -> None:
    """BOS/EOS framing applied by ``encode(add_special_tokens=True)``, as transformers builds it."""
    single = (f"{bos}:0 " if bos else "") + "$A:0" + (f" {eos}:0" if eos else "")
    pair = single + (f" {bos}:1" if bos else "") + " $B:1" + (f" {eos}:1" if eos else "")
    specials = [(t, backend.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


@lru_cache(maxsize=16)
def _compile_template(source: str):
    """Compile a chat template in the same sandbox/options transformers uses (templates are untrusted)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for training; render the body."""

        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
