"""Tokenizer: identical to transformers on the real default GGUF; HF dirs; streaming detokenization."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from fleetserve.models import ModelFiles
from fleetserve.tokenizer import Tokenizer, _byte_alphabet

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "1234567890 3.14159 2024-01-01 1,000,000",
    "   leading spaces,    runs of  spaces\t\ttabs   ",
    "line one\nline two\n\n\nafter blank lines\r\nwindows\n",
    "café naïve résumé Ærøskøbing ñandú Größe",
    "emoji 😀🎉👍🏽 👨‍👩‍👧‍👦 flags 🇫🇷",
    "中文测试，你好世界。日本語のテキスト 한국어",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "inline<|im_end|>special<|endoftext|>tokens <repo_name>",
    "",
    " ",
    "def f(x):\n    return x ** 2  # comment\n",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there! 😀"}],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
]


@pytest.fixture(scope="module")
def tok(default_gguf) -> Tokenizer:
    return Tokenizer.from_gguf(default_gguf)


@pytest.fixture(scope="module")
def ref(default_gguf):
    """transformers' tokenizer for the same GGUF (slow to build: once per module)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    return transformers.AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)


# ------------------------------------------------------------------ GGUF vs transformers


def test_metadata(tok):
    assert tok.vocab_size == 49152
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == (
        "<|im_start|>",
        1,
        "<|im_end|>",
        2,
    )
    assert tok.eos_token_ids == [2]
    assert "<|im_start|>" in tok.chat_template
    assert tok.id_to_token(2) == "<|im_end|>" and tok.id_to_token(tok.encode(" the")[0]) == "Ġthe"
    with pytest.raises(ValueError, match="out of range"):
        tok.id_to_token(10**6)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref(text)["input_ids"]
    assert tok.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert tok.decode(ids, skip_special_tokens=False) == text  # byte-level BPE round-trips exactly


def test_special_tokens_stay_whole(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "user\nhi"


def test_decode_random_ids_match_transformers(tok, ref):
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("messages", CHATS)
def test_chat_template_matches_transformers(tok, ref, messages):
    ours = tok.apply_chat_template(messages)
    assert ours == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.endswith("<|im_start|>assistant\n")
    no_prompt = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert no_prompt == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def test_chat_template_default_system(tok):
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert out.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


# ------------------------------------------------------------------ small synthetic GGUFs


def _write_gguf(path: Path, model: str = "gpt2", add_bos: bool = True) -> Path:
    gguf = pytest.importorskip("gguf")
    alpha = _byte_alphabet()
    tokens = (
        ["<|endoftext|>", "<s>"] + [alpha[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "<think>", "<ctl é>"]
    )
    types = [3, 3] + [6] * 256 + [1, 1, 1, 4, 3]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_uint32("tokenizer.ggml.eot_token_id", 258)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_add_bos_pre_split_and_added_tokens(tmp_path):
    path = _write_gguf(tmp_path / "tiny.gguf")
    tok = Tokenizer.from_gguf(path)
    text = "the the <think> 12345 x<s>y<|endoftext|>"
    ids = tok.encode(text)
    assert ids[0] == 1  # add_bos_token
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert 261 in ids  # <think> (user-defined) kept whole
    assert ids.count(1) == 2 and ids[-1] == 0
    assert tok.decode(ids) == "the the <think> 12345 xy"
    assert tok.eos_token_ids == [0, 258]  # eos + end-of-turn
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>hi"
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    assert ids == ref(text)["input_ids"]  # Qwen2 split: digits one by one, mislabeled control skipped
    assert tok.vocab_size == len(ref)


def test_unsupported_gguf_tokenizer_model(tmp_path):
    path = _write_gguf(tmp_path / "spm.gguf", model="llama")
    with pytest.raises(ValueError, match=r"'llama' is not supported.*'gpt2' \(byte-level BPE\)"):
        Tokenizer.from_gguf(path)


# ------------------------------------------------------------------ HF directories


def _save_hf_dir(tok: Tokenizer, path: Path, **config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tok.backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_hf_dir_round_trip(tok, tmp_path):
    path = _save_hf_dir(
        tok,
        tmp_path / "hf",
        bos_token={"content": "<|im_start|>", "special": True},
        eos_token="<|im_end|>",
        chat_template=tok.chat_template,
    )
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    hf = Tokenizer.from_model_files(ModelFiles("x", "x", "hf", path, "local"))
    assert (hf.bos_token_id, hf.eos_token_id, hf.eos_token_ids) == (1, 2, [2, 0])
    assert hf.vocab_size == tok.vocab_size
    for text in TEXTS:
        ids = tok.encode(text)
        assert hf.encode(text) == ids
        assert hf.decode(ids) == tok.decode(ids)
        assert hf.decode(ids, skip_special_tokens=False) == tok.decode(ids, skip_special_tokens=False)
    for messages in CHATS:
        assert hf.apply_chat_template(messages) == tok.apply_chat_template(messages)


def test_hf_dir_matches_transformers(tok, tmp_path):
    """BOS framing comes from tokenizer.json (transformers 5 ignores tokenizer_config's add_bos_token)."""
    transformers = pytest.importorskip("transformers")
    flagged = _save_hf_dir(
        tok,
        tmp_path / "flagged",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        add_bos_token=True,
        chat_template=tok.chat_template,
    )
    tiny = Tokenizer.from_gguf(_write_gguf(tmp_path / "tiny.gguf"))  # its tokenizer.json prepends <s>
    framed = _save_hf_dir(tiny, tmp_path / "framed", bos_token="<s>", eos_token="<|endoftext|>")
    for path, bos in ((flagged, False), (framed, True)):
        hf = Tokenizer.from_hf_dir(path)
        ref = transformers.AutoTokenizer.from_pretrained(str(path))
        for text in TEXTS:
            assert hf.encode(text) == ref(text)["input_ids"]
            assert hf.encode(text) == [hf.bos_token_id] * bos + hf.encode(text, add_special_tokens=False)
            assert hf.decode(hf.encode(text)) == ref.decode(ref(text)["input_ids"], skip_special_tokens=True)
    hf = Tokenizer.from_hf_dir(flagged)
    ref = transformers.AutoTokenizer.from_pretrained(str(flagged))
    for messages in CHATS:
        assert hf.apply_chat_template(messages) == ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )


def test_hf_dir_template_sources(tok, tmp_path):
    named = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    path = _save_hf_dir(tok, tmp_path / "named", chat_template=named)
    assert Tokenizer.from_hf_dir(path).chat_template == "DEFAULT"
    (path / "chat_template.jinja").write_text("FILE {{ messages | length }}")
    assert Tokenizer.from_hf_dir(path).apply_chat_template([{"role": "user", "content": "x"}]) == "FILE 1"
    bare = Tokenizer.from_hf_dir(_save_hf_dir(tok, tmp_path / "bare"))
    assert bare.chat_template is None and bare.bos_token is None and bare.eos_token_ids == []
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])


def test_hf_dir_without_tokenizer_json(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="unknown model format"):
        Tokenizer.from_model_files(ModelFiles("x", "x", "onnx", tmp_path, "local"))


# ------------------------------------------------------------------ chat template features


def _with_template(tok: Tokenizer, template: str) -> Tokenizer:
    return Tokenizer(tok.backend, bos_token=tok.bos_token, eos_token=tok.eos_token, chat_template=template)


def test_template_helpers(tok):
    t = _with_template(
        tok,
        (
            "{% if messages[0]['role'] == 'bad' %}{{ raise_exception('bad role') }}{% endif %}"
            "{{ bos_token }}|{{ eos_token }}|{{ strftime_now('%Y') | length }}|{{ tools | tojson }}|{{ extra }}"
            "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
            "{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
            "{% if add_generation_prompt %}>{% endif %}"
        ),
    )
    tools = [{"type": "function", "function": {"name": "f", "description": "é"}}]
    out = t.apply_chat_template(
        [{"role": "user", "content": "A"}, {"role": "user", "content": "B"}], tools=tools, extra="X"
    )
    assert (
        out
        == '<|im_start|>|<|im_end|>|4|[{"type": "function", "function": {"name": "f", "description": "é"}}]|XA>'
    )
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="bad role"):
        t.apply_chat_template([{"role": "bad", "content": ""}])


def test_template_is_sandboxed(tok):
    t = _with_template(tok, "{{ messages.__class__.__mro__ }}")
    import jinja2.exceptions

    with pytest.raises(jinja2.exceptions.SecurityError):
        t.apply_chat_template([])


# ------------------------------------------------------------------ incremental detokenization


def _stream(tok: Tokenizer, prompt: list[int], ids: list[int], rng: random.Random, skip: bool = True):
    det = tok.incremental_detokenizer(prompt, skip_special_tokens=skip)
    pieces, i = [], 0
    while i < len(ids):
        n = rng.choice([1, 1, 1, 2, 3])
        pieces.append(det.push(ids[i : i + n]))
        i += n
    pieces.append(det.flush())
    assert det.text == "".join(pieces)
    return pieces


def test_multibyte_held_back(tok):
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # the emoji is split across byte-level tokens
    det = tok.incremental_detokenizer(tok.encode("Say: "))
    outs = [det.push([i]) for i in ids]
    assert outs[:-1] == [""] * (len(ids) - 1) and outs[-1] == "😀"
    assert det.flush() == ""


def test_incomplete_tail_flushed(tok):
    ids = tok.encode("ok 😀", add_special_tokens=False)[:-1]
    det = tok.incremental_detokenizer([])
    pushed = "".join(det.push([i]) for i in ids)
    assert pushed.startswith("ok") and "\ufffd" not in pushed
    tail = det.flush()
    assert tail.endswith("\ufffd")  # the unfinished emoji is only given up at the end
    assert pushed + tail == det.text == tok.decode(ids)


def test_stream_equals_decode_property(tok):
    """For any ids (real text encodings, random vocab ids, specials) pushes + flush == decode(ids)."""
    rng = random.Random(1234)
    pools = [tok.encode(t, add_special_tokens=False) for t in TEXTS if t]
    for case in range(300):
        ids: list[int] = []
        for _ in range(rng.randrange(1, 6)):
            kind = rng.random()
            if kind < 0.6:
                pool = rng.choice(pools)
                start = rng.randrange(len(pool))
                ids += pool[start : start + rng.randrange(1, 12)]
            elif kind < 0.9:
                ids += [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 5))]
            else:
                ids.append(rng.choice([0, 1, 2, 5]))
        prompt = rng.choice([[], tok.encode("Hi 😀 there, 你好"), tok.encode("<|im_start|>assistant\n")])
        skip = case % 2 == 0
        pieces = _stream(tok, prompt, ids, rng, skip)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), ids


def test_stream_never_emits_partial_characters(tok):
    rng = random.Random(7)
    texts = [t for t in TEXTS if t] + ["🧑‍🚀 astronauts 🚀 and 漢字かな交じり文 ∑∫√ — “quotes”"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        for _ in range(5):
            pieces = _stream(tok, [], ids, rng, skip=False)
            assert "".join(pieces) == text
            assert not any("\ufffd" in p for p in pieces)
