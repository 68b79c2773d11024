"""Structured output (`response_format`) and tool calling, both by constrained decoding with llguidance.

Structured output runs on the real embedded model (SmolLM2-135M-Instruct). Tool calling runs on a tiny
randomly initialised Llama whose tokenizer files carry a Qwen2.5-style chat template with tool support:
under `tool_choice` naming a function (or "required") the grammar forces a well-formed call even from
random weights. The official `openai` client talks to both apps (uvicorn in a thread) to prove the
shapes are the SDK's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from fleetserve.config import ServeConfig
from fleetserve.engine.native.engine import EngineConfig, NativeEngine
from fleetserve.models import resolve_model
from fleetserve.server.app import create_app, new_state
from fleetserve.server.structured import GrammarProcessor, Guide, ResponseFormat, response_format_guide
from fleetserve.server.tools import (
    AssistantToolCall,
    ToolCallParser,
    parse_tool_calls,
    template_messages,
)
from fleetserve.tokenizer import Tokenizer
from tests.net import serve_in_thread
from tests.reference import write_tiny_checkpoint

try:
    import jsonschema
except ImportError:  # pragma: no cover - checked by hand below
    jsonschema = None


# ---- schemas and a validator ------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "student": {"type": "boolean"},
    },
    "required": ["name", "age", "color", "student"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
ASK_PERSON = [{"role": "user", "content": "Describe a person as JSON: name, age, favourite color, and "
                                          "whether they are a student."}]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time in a timezone.",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}},
                       "required": ["tz"], "additionalProperties": False},
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
USE_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


def validate(value: Any, schema: dict) -> None:
    """jsonschema when installed; otherwise the keywords these tests use, checked by hand."""
    if jsonschema is not None:
        jsonschema.validate(value, schema)
        return
    types = {"object": dict, "string": str, "boolean": bool, "array": list}
    t = schema.get("type")
    if t == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), value
    elif t is not None:
        assert isinstance(value, types[t]), (value, t)
    if "enum" in schema:
        assert value in schema["enum"], (value, schema["enum"])
    if "minimum" in schema:
        assert value >= schema["minimum"], value
    if "maximum" in schema:
        assert value <= schema["maximum"], value
    if "maxLength" in schema:
        assert len(value) <= schema["maxLength"], value
    if "minLength" in schema:
        assert len(value) >= schema["minLength"], value
    if t == "object":
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            assert key in value, (key, value)
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(props), (value, props)
        for key, sub in props.items():
            if key in value:
                validate(value[key], sub)


# ---- live servers -----------------------------------------------------------------------------


@dataclass
class Live:
    url: str
    name: str
    tokenizer: Tokenizer

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=120)

    def post(self, path: str, body: dict) -> httpx.Response:
        return httpx.post(f"{self.url}/v1{path}", json=body, timeout=120)

    def sse(self, path: str, body: dict) -> list[dict]:
        with httpx.Client(timeout=120) as c, c.stream("POST", f"{self.url}/v1{path}",
                                                      json={**body, "stream": True}) as r:
            assert r.status_code == 200, r.read()
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def _serve(engine, tokenizer, model: str | None = None) -> Iterator[Live]:
    files = resolve_model("default", download=False)
    state = new_state(ServeConfig(served_model_name=model) if model else ServeConfig(), files)
    state.engine, state.tokenizer = engine, tokenizer
    with serve_in_thread(create_app(state, load=False)) as url:
        yield Live(url, state.served_model_name, tokenizer)


@pytest.fixture(scope="module")
def live(default_engine, tokenizer):
    yield from _serve(default_engine, tokenizer)


# A Qwen2.5-style template: tools in the system prompt, past calls as <tool_call> blocks with their
# arguments as JSON objects, tool results as <tool_response> blocks in a user turn.
QWEN_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n" }}
    {{- "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, "
        "\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or
           (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory, tokenizer):
    """(tokenizer, engine) of a tiny random Llama whose chat template renders tools."""
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("qwen-tools"), "llama", tokenizer,
                                 max_position_embeddings=2048)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN_TEMPLATE}))
    tok = Tokenizer.from_hf_dir(path)
    engine = NativeEngine.load("hf", path, tok.eos_token_ids, EngineConfig(max_model_len=2048),
                               torch.device("cpu"), torch.float32)
    engine.start()
    yield tok, engine
    engine.stop()


@pytest.fixture(scope="module")
def tool_live(tool_model):
    tok, engine = tool_model
    yield from _serve(engine, tok, model="tiny-qwen-tools")


# ---- structured output on the embedded model ----------------------------------------------------


def _json_choices(body: dict) -> list[Any]:
    out = []
    for choice in body["choices"]:
        assert choice["finish_reason"] == "stop", choice
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        out.append(json.loads(text))
    return out


def test_json_object_greedy_and_sampled(live):
    greedy = live.post("/chat/completions", {"messages": ASK_PERSON, "temperature": 0, "max_tokens": 150,
                                             "response_format": {"type": "json_object"}})
    assert greedy.status_code == 200, greedy.text
    [value] = _json_choices(greedy.json())
    assert isinstance(value, dict) and value

    # temperature 0.7, three seeded choices (seeds 1, 2, 3) batched together, each with its own matcher
    r = live.post("/chat/completions", {"messages": ASK_PERSON, "temperature": 0.7, "seed": 1, "n": 3,
                                        "max_tokens": 200, "response_format": {"type": "json_object"}})
    assert r.status_code == 200, r.text
    values = _json_choices(r.json())
    assert len(values) == 3 and all(isinstance(v, dict) for v in values)


def test_json_schema_strict_greedy_sampled_and_streamed(live):
    base = {"messages": ASK_PERSON, "max_tokens": 200, "response_format": PERSON_FORMAT}
    greedy = live.post("/chat/completions", {**base, "temperature": 0})
    assert greedy.status_code == 200, greedy.text
    for value in _json_choices(greedy.json()):
        validate(value, PERSON)

    sampled = live.post("/chat/completions", {**base, "temperature": 1, "seed": 3, "n": 3})
    assert sampled.status_code == 200, sampled.text
    values = _json_choices(sampled.json())
    assert len(values) == 3
    for value in values:
        validate(value, PERSON)

    events = live.sse("/chat/completions", {**base, "temperature": 1, "seed": 11})
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    validate(json.loads(text), PERSON)


def test_json_schema_on_completions(live):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                               "confidence": {"type": "integer", "minimum": 0, "maximum": 10}},
              "required": ["answer", "confidence"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}}
    r = live.post("/completions", {"prompt": "Is Paris in France? Answer in JSON:", "max_tokens": 60,
                                   "temperature": 0, "response_format": fmt})
    assert r.status_code == 200, r.text
    for value in _json_choices(r.json()):
        validate(value, schema)
    events = live.sse("/completions", {"prompt": "Is Paris in France? Answer in JSON:", "max_tokens": 60,
                                       "temperature": 1, "seed": 5, "response_format": fmt})
    validate(json.loads("".join(e["choices"][0]["text"] for e in events if e["choices"])), schema)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=18, le=99)
    color: Literal["red", "green", "blue"]
    student: bool


def test_openai_sdk_parses_structured_output(live):
    """The SDK's own structured-output helper: pydantic model -> strict json_schema -> parsed object."""
    r = live.client.chat.completions.parse(model=live.name, messages=ASK_PERSON, response_format=Person,
                                           temperature=0, max_tokens=200)
    assert r.choices[0].finish_reason == "stop"
    person = r.choices[0].message.parsed
    assert isinstance(person, Person)
    assert 18 <= person.age <= 99 and person.color in ("red", "green", "blue")


@pytest.mark.parametrize("fmt,where", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}, "foo"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                    "properties": {"a": {"$ref": "#/nope"}}}}},
     "nope"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": "zero"}}},
     "minimum"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "xml"}, None),
    ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, None),
])
@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_invalid_response_format_is_400(live, fmt, where, path):
    body = {"messages": ASK_PERSON} if path == "/chat/completions" else {"prompt": "hi"}
    r = live.post(path, {**body, "max_tokens": 5, "response_format": fmt})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] is not None and err["param"].startswith("response_format"), err
    assert err["type"] == "invalid_request_error"
    if where:
        assert where in err["message"], err


def test_default_model_has_no_tool_support(live):
    """SmolLM2's template never renders tools: asking it to use them is a 400, "none" is plain chat."""
    r = live.post("/chat/completions", {"messages": ASK_WEATHER, "tools": [WEATHER], "max_tokens": 4})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "tools"
    assert "chat template" in r.json()["error"]["message"]
    r = live.post("/chat/completions", {"messages": ASK_WEATHER, "tools": [WEATHER], "tool_choice": "none",
                                        "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert "tool_calls" not in r.json()["choices"][0]["message"]


def test_processor_resyncs_after_rewind(tokenizer):
    """Called again with a shorter / different history (preemption), the mask equals a fresh matcher's."""
    guide = response_format_guide(tokenizer, ResponseFormat.model_validate(PERSON_FORMAT))
    assert isinstance(guide, Guide)
    ids = tokenizer.encode('{"name": "Ann", "age": 3', add_special_tokens=False)

    def mask(proc: GrammarProcessor, history: list[int]) -> torch.Tensor:
        row = torch.zeros(tokenizer.vocab_size + 7)  # a padded lm_head is masked beyond the vocabulary
        proc(history, row)
        return torch.isfinite(row)

    proc = guide.processor()
    for n in range(len(ids) + 1):
        mask(proc, ids[:n])
    for n in (len(ids), 3, 0, len(ids) - 1):  # the same ids again, then rewinds
        assert torch.equal(mask(proc, ids[:n]), mask(guide.processor(), ids[:n])), n
    allowed = mask(proc, ids)
    assert not allowed[tokenizer.vocab_size:].any()
    assert allowed[tokenizer.encode("0", add_special_tokens=False)[0]]  # 30..39 may follow "age": 3
    assert not allowed[tokenizer.encode('"', add_special_tokens=False)[0]]
    done = tokenizer.encode('{"name": "Ann", "age": 30, "color": "red", "student": true}', add_special_tokens=False)
    final = mask(proc, done)
    assert final.nonzero().flatten().tolist() == tokenizer.eos_token_ids  # complete: only EOS


# ---- tool calling on a tiny random model ------------------------------------------------------


def _assert_call(call: dict, tool: dict) -> dict:
    assert set(call) == {"id", "type", "function"}
    assert call["id"].startswith("call_") and len(call["id"]) > len("call_")
    assert call["type"] == "function"
    assert call["function"]["name"] == tool["function"]["name"]
    assert isinstance(call["function"]["arguments"], str)
    args = json.loads(call["function"]["arguments"])
    validate(args, tool["function"]["parameters"])
    return args


def test_named_tool_choice_forces_a_call(tool_live):
    body = {"messages": ASK_WEATHER, "tools": [WEATHER, TIME], "tool_choice": USE_WEATHER, "temperature": 0,
            "max_tokens": 120}
    r = tool_live.post("/chat/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["role"] == "assistant" and message["content"] is None
    [call] = message["tool_calls"]
    _assert_call(call, WEATHER)

    # streamed: the same call, in OpenAI's incremental shape
    events = tool_live.sse("/chat/completions", body)
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    pieces = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert pieces and all(tc["index"] == 0 for tc in pieces)
    first, rest = pieces[0], pieces[1:]
    assert first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"]["name"] == "get_weather"
    assert all(set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"} for tc in rest)
    assert len(rest) >= 2  # the arguments arrive piece by piece as the tokens come
    arguments = "".join(tc["function"].get("arguments", "") for tc in pieces)
    assert arguments == call["function"]["arguments"]  # greedy: the same call as above
    assert not any(d.get("content") for d in deltas)
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_required_tool_choice_and_sampling(tool_live):
    for seed in (1, 2):
        r = tool_live.post("/chat/completions", {"messages": ASK_WEATHER, "tools": [WEATHER, TIME],
                                                 "tool_choice": "required", "parallel_tool_calls": False,
                                                 "temperature": 1, "seed": seed, "max_tokens": 120})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        [call] = choice["message"]["tool_calls"]
        _assert_call(call, WEATHER if call["function"]["name"] == "get_weather" else TIME)


def test_tool_choice_none_gives_plain_content(tool_live, tool_model):
    tok, _ = tool_model
    r = tool_live.post("/chat/completions", {"messages": ASK_WEATHER, "tools": [WEATHER], "tool_choice": "none",
                                             "temperature": 0, "max_tokens": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    message = body["choices"][0]["message"]
    assert isinstance(message["content"], str) and "tool_calls" not in message
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    # "none" renders no tools at all: the prompt is the plain chat prompt
    plain = tok.encode(tok.apply_chat_template(ASK_WEATHER), add_special_tokens=False)
    assert body["usage"]["prompt_tokens"] == len(plain)


def test_tool_results_follow_up_renders_through_template(tool_live, tool_model):
    tok, _ = tool_model
    messages = [
        *ASK_WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    r = tool_live.post("/chat/completions", {"messages": messages, "tools": [WEATHER], "temperature": 0,
                                             "max_tokens": 8})
    assert r.status_code == 200, r.text
    expected = tok.apply_chat_template([
        *ASK_WEATHER,
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 1}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ], tools=[WEATHER])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 1}}' \
        '\n</tool_call>' in expected
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in expected
    assert r.json()["usage"]["prompt_tokens"] == len(tok.encode(expected, add_special_tokens=False))

    bad = tool_live.post("/chat/completions", {"messages": [*messages[:2], {"role": "tool", "content": "21"}],
                                               "tools": [WEATHER], "max_tokens": 4})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages.2.tool_call_id"


@pytest.mark.parametrize("patch,param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "foo"}}}],
      "tool_choice": USE_WEATHER}, "tools"),
    ({"tool_choice": USE_WEATHER, "response_format": {"type": "json_object"}}, "response_format"),
])
def test_invalid_tool_requests_are_400(tool_live, patch, param):
    r = tool_live.post("/chat/completions", {"messages": ASK_WEATHER, "tools": [WEATHER], "max_tokens": 4, **patch})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_openai_sdk_tool_calls_and_stream_accumulation(tool_live):
    client = tool_live.client
    kwargs = {"model": tool_live.name, "messages": ASK_WEATHER, "tools": [WEATHER], "tool_choice": USE_WEATHER,
              "temperature": 0, "max_tokens": 120}
    r = client.chat.completions.create(**kwargs)
    assert r.choices[0].finish_reason == "tool_calls"
    [call] = r.choices[0].message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # the SDK's stream helper rebuilds the message from our deltas
    with client.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    [streamed] = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls"
    assert streamed.function.name == call.function.name
    assert streamed.function.arguments == call.function.arguments


# ---- the parser on hand-written model outputs -------------------------------------------------


def test_parser_text_and_calls():
    content, calls = parse_tool_calls(
        'Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>')
    assert content == "Let me check both."
    assert [c["function"] for c in calls] == [{"name": "get_weather", "arguments": '{"city": "Paris"}'},
                                              {"name": "get_time", "arguments": '{"tz": "CET"}'}]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2

    content, [call] = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>')
    assert content is None and call["function"] == {"name": "f", "arguments": "{}"}
    # unclosed at the end (EOS right after the JSON); arguments given as a string
    _, [call] = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}')
    assert call["function"] == {"name": "f", "arguments": '{"a": 1}'}


def test_parser_leaves_malformed_blocks_and_plain_text_alone():
    text = 'Hi <tool_call>\n{"name": "f", "arguments": {oops}}\n</tool_call> bye'
    assert parse_tool_calls(text) == (text, [])
    assert parse_tool_calls("no calls here <tool_") == ("no calls here <tool_", [])
    assert parse_tool_calls('<tool_call>\n["not", "a call"]\n</tool_call>')[1] == []
    content, [call] = parse_tool_calls(
        '<tool_call>\n{"name": broken\n</tool_call>\n<tool_call>\n{"name": "g", "arguments": {"x": 1}}\n</tool_call>')
    assert content == '<tool_call>\n{"name": broken\n</tool_call>'
    assert call["function"] == {"name": "g", "arguments": '{"x": 1}'}


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_stream_parser_holds_back_and_reassembles(step):
    text = ('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa}ris", "n": {"a": 1}}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    parser, content, entries = ToolCallParser(), "", []
    for i in range(0, len(text), step):
        c, d = parser.feed(text[i:i + step])
        assert "<" not in c  # never a piece of <tool_call>
        content, entries = content + c, entries + d
    c, d = parser.finish()
    content, entries = content + c, entries + d
    assert content == "Sure."
    calls: dict[int, dict] = {}
    for e in entries:
        if "id" in e:
            assert e["index"] not in calls and e["type"] == "function" and "name" in e["function"]
            calls[e["index"]] = {"name": e["function"]["name"], "arguments": ""}
        calls[e["index"]]["arguments"] += e["function"].get("arguments", "")
    _, whole = parse_tool_calls(text)
    assert [calls[0], calls[1]] == [c["function"] for c in whole]
    assert calls[0]["arguments"] == '{"city": "Pa}ris", "n": {"a": 1}}'
    # plain text streams through unchanged, except a trailing maybe-tag held until it is decided
    p = ToolCallParser()
    assert p.feed("a < b <tool") == ("a < b", [])
    assert p.feed("s are fun") == (" <tools are fun", [])


def test_template_messages_shapes():
    class M:
        def __init__(self, role, content="", **kw):
            self.role, self.content, self.name = role, content, None
            self.tool_calls = kw.get("tool_calls")
            self.tool_call_id = kw.get("tool_call_id")

        def text(self):
            return self.content or ""

    call = AssistantToolCall.model_validate({"id": "c1", "type": "function",
                                             "function": {"name": "f", "arguments": '{"a": [1, 2]}'}})
    out = template_messages([M("user", "q"), M("assistant", None, tool_calls=[call]),
                             M("tool", "42", tool_call_id="c1")])
    assert out[1]["tool_calls"] == [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": [1, 2]}}}]
    assert out[2] == {"role": "tool", "content": "42", "tool_call_id": "c1"}
