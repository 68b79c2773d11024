"""Workloads: what each benchmark request asks for.

A workload is a deterministic function of (seed, stream, index) -> :class:`BenchRequest`, so the same
seed gives the same prompts, an A/B comparison sends identical requests to both endpoints, and a
``--duration`` run can draw as many requests as it needs. ``stream`` 0 is the warm-up; stream ``k + 1``
is sweep level ``k``. Generated workloads (random, shared-prefix) draw fresh prompts for every stream,
so no level gets a head start from an earlier level's prefix cache; file workloads (sharegpt, prompts)
reuse the same prompts in every level (and take warm-up prompts from the far end of the file).

Generated prompts are sequences of whole-word vocabulary tokens (" apple", " river", ...) chosen with
the tokenizer so that the text re-encodes to exactly the requested number of tokens (BOS included if the
tokenizer adds one); every prompt is verified by encoding it again. On the completions endpoint they are
sent as token ids, so the server sees exactly those tokens.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from fleetserve.models import ModelFiles
    from fleetserve.tokenizer import Tokenizer

DATASETS = ("random", "sharegpt", "prompts", "shared-prefix")
_WORD = re.compile(r"^ [A-Za-z]{2,}$")
_BARE_WORD = re.compile(r"^[A-Za-z]{2,}$")
# vLLM's ShareGPT filter (benchmark_dataset.is_valid_sequence defaults), kept for comparable numbers.
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048


class DatasetError(ValueError):
    """A workload cannot be built; the message says what was wrong and what is allowed."""


@dataclass
class BenchRequest:
    """One request of a workload."""

    index: int
    prompt: str  # completions: the whole prompt text
    prompt_len: int  # tokens of `prompt` as the tokenizer counts them (what a completions server sees)
    output_len: int  # max_tokens
    prompt_token_ids: list[int] | None = None  # sent instead of `prompt` on the completions endpoint
    messages: list[dict[str, str]] = field(default_factory=list)  # chat: the conversation

    def __post_init__(self) -> None:
        if not self.messages:
            self.messages = [{"role": "user", "content": self.prompt}]


class Workload(Protocol):
    name: str

    def request(self, i: int, stream: int) -> BenchRequest: ...

    def describe(self) -> dict[str, Any]: ...


def load_tokenizer(files: ModelFiles) -> Tokenizer:
    """The tokenizer of resolved model files, loaded once per process (reading a GGUF takes seconds)."""
    return _load_tokenizer(files.format, Path(files.path))


@lru_cache(maxsize=4)
def _load_tokenizer(fmt: str, path: Path) -> Tokenizer:
    from fleetserve.tokenizer import Tokenizer

    if fmt == "gguf":
        return Tokenizer.from_gguf(path)
    return Tokenizer.from_hf_dir(path)


# ---------------------------------------------------------------- exact-length prompts


class PromptBuilder:
    """Builds texts that encode to an exact number of tokens from whole-word vocabulary tokens.

    Use :meth:`for_tokenizer`: scanning the vocabulary takes a second, so one builder per tokenizer.
    """

    _cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> PromptBuilder:
        builder = cls._cache.get(tokenizer)
        if builder is None:
            builder = cls._cache[tokenizer] = cls(tokenizer)
        return builder

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        backend = tokenizer.backend
        size = backend.get_vocab_size(with_added_tokens=False)
        texts = backend.decode_batch([[i] for i in range(size)], skip_special_tokens=True)
        # Byte-level BPE: " word" is one token and the pre-tokenizer splits text before each space,
        # so a run of such pieces re-encodes piece by piece.
        pieces = [t for t in texts if _WORD.match(t)]
        if pieces:
            enc = backend.encode_batch(pieces, add_special_tokens=False)
            pieces = [p for p, e in zip(pieces, enc) if len(e.ids) == 1]
        if len(pieces) < 100:  # e.g. SentencePiece vocabularies: fall back to " " + bare words
            pieces = sorted({" " + t for t in texts if _BARE_WORD.match(t) or _WORD.match(t)})
        if len(pieces) < 10:
            raise DatasetError("the tokenizer's vocabulary has too few word tokens to generate prompts; "
                               "use --dataset sharegpt or --dataset prompts with a file")
        self.pieces = sorted(set(pieces))
        self.num_special = len(tokenizer.encode(""))  # BOS/EOS the tokenizer adds to every text

    def text(self, n: int, rng: np.random.Generator, add_special_tokens: bool = True) -> tuple[str, list[int]]:
        """A text of exactly ``n`` tokens (counting added special tokens when ``add_special_tokens``)."""
        enc = self.tokenizer.encode
        base = self.num_special if add_special_tokens else 0
        if n <= base:
            raise DatasetError(f"a prompt of {n} tokens is too short: this tokenizer adds {base} special "
                               f"token(s) to every prompt; use a length of at least {base + 1}")
        picks = [self.pieces[j] for j in rng.integers(len(self.pieces), size=n - base)]
        for _ in range(4 * n + 64):
            text = "".join(picks)
            ids = enc(text, add_special_tokens=add_special_tokens)
            if len(ids) == n:
                return text, ids
            if len(ids) > n:
                del picks[max(1, len(picks) - (len(ids) - n)):]
                if len(ids) > n and len(picks) == 1:
                    picks = [self.pieces[int(rng.integers(len(self.pieces)))]]
            else:
                picks += [self.pieces[j] for j in rng.integers(len(self.pieces), size=n - len(ids))]
        raise DatasetError(f"could not build a prompt of exactly {n} tokens with this tokenizer; "
                           "use --dataset prompts with your own prompts")


def _lengths(rng: np.random.Generator, mean: int, ratio: float, minimum: int = 1) -> int:
    """Uniform integer in [mean * (1 - ratio), mean * (1 + ratio)] (vLLM's --random-range-ratio)."""
    if ratio <= 0:
        return mean
    lo, hi = max(minimum, round(mean * (1 - ratio))), max(minimum, round(mean * (1 + ratio)))
    return int(rng.integers(lo, hi + 1))


class RandomWorkload:
    """Prompts of (about, with --range-ratio) ``input_len`` tokens asking for ``output_len`` tokens."""

    name = "random"

    def __init__(self, tokenizer: Tokenizer, input_len: int, output_len: int, range_ratio: float = 0.0,
                 seed: int = 0):
        if input_len < 1 or output_len < 1:
            raise DatasetError(f"--input-len and --output-len must be at least 1, got {input_len} and {output_len}")
        if not 0 <= range_ratio < 1:
            raise DatasetError(f"--range-ratio must be in [0, 1), got {range_ratio}")
        self.builder = PromptBuilder.for_tokenizer(tokenizer)
        self.input_len, self.output_len, self.range_ratio, self.seed = input_len, output_len, range_ratio, seed

    def request(self, i: int, stream: int) -> BenchRequest:
        rng = np.random.default_rng([self.seed, stream, i])
        n_in = _lengths(rng, self.input_len, self.range_ratio, self.builder.num_special + 1)
        n_out = _lengths(rng, self.output_len, self.range_ratio)
        text, ids = self.builder.text(n_in, rng)
        return BenchRequest(i, text, len(ids), n_out, prompt_token_ids=ids)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "input_len": self.input_len, "output_len": self.output_len,
                "range_ratio": self.range_ratio}


class SharedPrefixWorkload:
    """``num_groups`` long system prompts; request i belongs to group i % num_groups and adds its own question.

    With prefix caching, only the first request of each group computes the shared prefix: compare the
    TTFT of this workload with a random workload of the same total length to see the cache at work.
    """

    name = "shared-prefix"

    def __init__(self, tokenizer: Tokenizer, num_groups: int, prefix_len: int, suffix_len: int, output_len: int,
                 seed: int = 0):
        if num_groups < 1 or prefix_len < 1 or suffix_len < 1 or output_len < 1:
            raise DatasetError("--num-groups, --prefix-len, --suffix-len and --output-len must be at least 1, got "
                               f"{num_groups}, {prefix_len}, {suffix_len} and {output_len}")
        self.builder = PromptBuilder.for_tokenizer(tokenizer)
        self.num_groups, self.prefix_len, self.suffix_len = num_groups, prefix_len, suffix_len
        self.output_len, self.seed = output_len, seed
        self._prefixes: dict[tuple[int, int], str] = {}

    def prefix(self, group: int, stream: int) -> str:
        key = (stream, group)
        if key not in self._prefixes:
            rng = np.random.default_rng([self.seed, stream, 1, group])
            self._prefixes[key] = self.builder.text(self.prefix_len, rng)[0]
        return self._prefixes[key]

    def request(self, i: int, stream: int) -> BenchRequest:
        group = i % self.num_groups
        prefix = self.prefix(group, stream)
        suffix, _ = self.builder.text(self.suffix_len, np.random.default_rng([self.seed, stream, 0, i]),
                                      add_special_tokens=False)
        ids = self.builder.tokenizer.encode(prefix + suffix)
        messages = [{"role": "system", "content": prefix.strip()}, {"role": "user", "content": suffix.strip()}]
        return BenchRequest(i, prefix + suffix, len(ids), self.output_len, prompt_token_ids=ids, messages=messages)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "num_groups": self.num_groups, "prefix_len": self.prefix_len,
                "suffix_len": self.suffix_len, "output_len": self.output_len}


# ---------------------------------------------------------------- file workloads


class _Filtered:
    """The k-th accepted item of a fixed order, found lazily (big files are not tokenized up front)."""

    def __init__(self, order: list[int], accept):
        self.order, self.accept = order, accept
        self.items: list[Any] = []
        self.pos = 0

    def get(self, k: int, what: str) -> Any:
        while len(self.items) <= k and self.pos < len(self.order):
            item = self.accept(self.order[self.pos])
            self.pos += 1
            if item is not None:
                self.items.append(item)
        if not self.items:
            raise DatasetError(f"{what} has no usable entries")
        return self.items[k % len(self.items)]  # cycle when the file has fewer entries than requests


class ShareGPTWorkload:
    """A ShareGPT-format JSON file: the first human turn is the prompt, the reply's length the output length.

    Entries are shuffled with the seed; like vLLM, entries whose prompt or reply is shorter than 4 tokens,
    whose prompt exceeds 1024 tokens or whose prompt + reply exceeds 2048 tokens are skipped (the reply
    limits do not apply when --output-len fixes the output length).
    """

    name = "sharegpt"

    def __init__(self, path: Path, tokenizer: Tokenizer, output_len: int | None = None, seed: int = 0):
        self.path, self.tokenizer, self.output_len = Path(path), tokenizer, output_len
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot read ShareGPT file {self.path}: {exc}") from exc
        if not isinstance(data, list):
            raise DatasetError(f"{self.path} is not a ShareGPT file: expected a JSON list of "
                               '{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}')
        self.entries = data
        order = np.random.default_rng(seed).permutation(len(data)).tolist()
        self._forward = _Filtered(order, self._accept)
        self._backward = _Filtered(order[::-1], self._accept)

    def _accept(self, j: int) -> BenchRequest | None:
        entry = self.entries[j]
        conv = (entry.get("conversations") or entry.get("conversation")) if isinstance(entry, dict) else None
        if not isinstance(conv, list) or len(conv) < 2:
            return None
        turns = [t.get("value", t.get("content")) if isinstance(t, dict) else None for t in conv[:2]]
        if not all(isinstance(t, str) and t for t in turns):
            return None
        prompt, reply = turns
        prompt_len = len(self.tokenizer.encode(prompt))
        if self.output_len is not None:
            return BenchRequest(j, prompt, prompt_len, self.output_len)
        output_len = len(self.tokenizer.encode(reply, add_special_tokens=False))
        if prompt_len < SHAREGPT_MIN_LEN or output_len < SHAREGPT_MIN_LEN:
            return None
        if prompt_len > SHAREGPT_MAX_PROMPT_LEN or prompt_len + output_len > SHAREGPT_MAX_TOTAL_LEN:
            return None
        return BenchRequest(j, prompt, prompt_len, output_len)

    def request(self, i: int, stream: int) -> BenchRequest:
        src = self._backward if stream == 0 else self._forward
        r = src.get(i, str(self.path))
        return BenchRequest(i, r.prompt, r.prompt_len, r.output_len)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "output_len": self.output_len}


class PromptsWorkload:
    """A JSONL file, one request a line: ``{"prompt": "...", "output_len": 64}`` (output_len optional).

    Prompts are used in file order (cycling when more requests are needed); warm-up requests take lines
    from the end of the file. A prompt may also be a list of token ids.
    """

    name = "prompts"

    def __init__(self, path: Path, tokenizer: Tokenizer, output_len: int):
        self.path, self.tokenizer, self.output_len = Path(path), tokenizer, output_len
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise DatasetError(f"cannot read prompts file {self.path}: {exc}") from exc
        self.items: list[BenchRequest] = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise DatasetError(f"{self.path}:{n} is not JSON ({exc}); each line must be "
                                   '{"prompt": "...", "output_len": N}') from exc
            prompt = obj.get("prompt") if isinstance(obj, dict) else None
            out = obj.get("output_len", output_len) if isinstance(obj, dict) else None
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                item = BenchRequest(len(self.items), self.tokenizer.decode(prompt), len(prompt), out,
                                    prompt_token_ids=list(prompt))
            elif isinstance(prompt, str) and prompt:
                item = BenchRequest(len(self.items), prompt, len(self.tokenizer.encode(prompt)), out)
            else:
                raise DatasetError(f'{self.path}:{n}: "prompt" must be a non-empty string or list of token ids')
            if not isinstance(out, int) or isinstance(out, bool) or out < 1:
                raise DatasetError(f'{self.path}:{n}: "output_len" must be a positive integer, got {out!r}')
            self.items.append(item)
        if not self.items:
            raise DatasetError(f"{self.path} has no prompts; each line must be "
                               '{"prompt": "...", "output_len": N}')

    def request(self, i: int, stream: int) -> BenchRequest:
        k = (len(self.items) - 1 - i) if stream == 0 else i
        r = self.items[k % len(self.items)]
        return BenchRequest(i, r.prompt, r.prompt_len, r.output_len, prompt_token_ids=r.prompt_token_ids)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "output_len": self.output_len}


def build_workload(name: str, tokenizer: Tokenizer, *, seed: int = 0, dataset_path: Path | None = None,
                   input_len: int = 1024, output_len: int | None = None, range_ratio: float = 0.0,
                   num_groups: int = 4, prefix_len: int = 512, suffix_len: int = 32) -> Workload:
    """The workload ``--dataset name`` describes (``output_len`` None: the dataset's own or 128)."""
    if name in ("sharegpt", "prompts") and dataset_path is None:
        raise DatasetError(f"--dataset {name} needs --dataset-path FILE")
    if name == "random":
        return RandomWorkload(tokenizer, input_len, output_len or 128, range_ratio, seed)
    if name == "shared-prefix":
        return SharedPrefixWorkload(tokenizer, num_groups, prefix_len, suffix_len, output_len or 128, seed)
    if name == "sharegpt":
        return ShareGPTWorkload(dataset_path, tokenizer, output_len, seed)
    if name == "prompts":
        return PromptsWorkload(dataset_path, tokenizer, output_len or 128)
    raise DatasetError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
