"""Tool calling for chat models whose template renders tools (Qwen2.5 / Hermes style).

The template receives the request's `tools`; the model answers with blocks like

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

which become `message.tool_calls` (finish_reason "tool_calls"); the text outside the blocks is the
content. `tool_choice` "required" or a named function is enforced by constrained decoding: a Lark
grammar (`<tool_call>\\n` + JSON matching the function's parameters + `\\n</tool_call>`) run by
`structured.py`. "none" renders no tools and parses nothing.

One parser (:class:`ToolCallParser`) serves both response shapes: streaming feeds it each text delta
and gets content (holding back what may be the start of `<tool_call>`) plus OpenAI-shaped
`delta.tool_calls` entries (index, id, type and function.name first, then function.arguments
pieces); non-streaming feeds it the whole text at once, so both agree on content and arguments.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fleetserve.server.errors import APIError
from fleetserve.server.generation import ChoiceResult, TextDelta
from fleetserve.server.structured import lark_grammar

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"

# How a forced call is written: exactly what Qwen2.5's template renders for past calls (json.dumps defaults).
_CALL_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# ---- request shapes (the API contract; protocol.py uses these) ---------------------------------

_NAME = r"^[A-Za-z0-9_.-]+$"


class FunctionDef(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None


class ToolDef(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends a JSON string


class AssistantToolCall(BaseModel):
    """A past call in an assistant message of the conversation."""

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


# ---- planning ---------------------------------------------------------------------------------


@dataclass
class ToolPlan:
    template_tools: list[dict] | None  # what the chat template receives (None: no tools rendered)
    parse: bool  # turn <tool_call> blocks of the output into tool_calls
    grammar: str | None  # a llguidance grammar that forces a call (tool_choice "required" / named)


def supports_tools(chat_template: str | None) -> bool:
    """Whether the template reads a `tools` variable (otherwise the model never sees the tools)."""
    return bool(chat_template) and re.search(r"\btools\b", chat_template) is not None


def plan_tools(tools: list[ToolDef] | None, tool_choice: ToolChoice | None, parallel_tool_calls: bool | None,
               chat_template: str | None) -> ToolPlan | None:
    """Validates tools/tool_choice for this model; None when the request involves no tools."""
    if not tools:
        if tool_choice is not None and tool_choice != "none":
            raise APIError(400, "tool_choice needs tools: give the functions the model may call in `tools`, "
                                "or leave tool_choice out", "tool_choice")
        return None
    choice = tool_choice if tool_choice is not None else "auto"
    if choice == "none":
        return None
    if not supports_tools(chat_template):
        raise APIError(400, "this model's chat template does not support tools, so the model cannot be shown "
                            "them; leave tools out (or set tool_choice to \"none\"), or serve a model whose chat "
                            "template renders tools (e.g. Qwen2.5 or Hermes style)", "tools", "unsupported_parameter")
    names = [t.function.name for t in tools]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise APIError(400, f"tools: the function name '{dup}' appears more than once; names must be unique",
                       "tools")
    forced: list[ToolDef] | None = None
    if isinstance(choice, NamedToolChoice):
        forced = [t for t in tools if t.function.name == choice.function.name]
        if not forced:
            raise APIError(400, f"tool_choice names the function '{choice.function.name}', which is not in tools "
                                f"(available: {', '.join(names)})", "tool_choice")
    elif choice == "required":
        forced = list(tools)
    grammar = None
    if forced is not None:
        parallel = choice == "required" and parallel_tool_calls is not False
        grammar = forced_call_grammar(forced, parallel)
    return ToolPlan([t.model_dump(exclude_none=True) for t in tools], True, grammar)


def _call_schema(tool: ToolDef) -> dict[str, Any]:
    params = tool.function.parameters
    if params is None:
        params = {"type": "object", "properties": {}, "additionalProperties": False}
    return {"type": "object", "properties": {"name": {"const": tool.function.name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": _CALL_JSON_OPTIONS}


def forced_call_grammar(tools: list[ToolDef], parallel: bool) -> str:
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, once or (parallel) more times."""
    alternatives = " | ".join(f"body{i}" for i in range(len(tools)))
    repeat = ' ("\\n" call)*' if parallel else ""
    lines = [f"start: call{repeat}", f'call: "{TOOL_OPEN}\\n" ({alternatives}) "\\n{TOOL_CLOSE}"']
    lines += [f"body{i}: %json {json.dumps(_call_schema(t))}" for i, t in enumerate(tools)]
    lark = "\n".join(lines) + "\n"
    return lark_grammar(lark)


# ---- conversation -> template messages --------------------------------------------------------


def template_messages(messages: list[Any]) -> list[dict]:
    """Chat messages as the template sees them: past tool calls (arguments as objects, as Qwen/Hermes
    templates expect) and tool results (with their tool_call_id)."""
    out = []
    for i, m in enumerate(messages):
        d: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name:
            d["name"] = m.name
        calls = getattr(m, "tool_calls", None)
        if calls:
            if m.role != "assistant":
                raise APIError(400, f"messages.{i}.tool_calls: only assistant messages carry tool calls",
                               f"messages.{i}.tool_calls")
            d["tool_calls"] = [_template_call(c) for c in calls]
        if m.role == "tool":
            call_id = getattr(m, "tool_call_id", None)
            if not call_id:
                raise APIError(400, f"messages.{i}.tool_call_id: a tool message must say which call it answers "
                                    "(the id of a tool call in an earlier assistant message)",
                               f"messages.{i}.tool_call_id")
            d["tool_call_id"] = call_id
        out.append(d)
    return out


def _template_call(call: AssistantToolCall) -> dict:
    args: Any = call.function.arguments
    if isinstance(args, str):
        try:
            parsed = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            args = parsed
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": args}}


# ---- output parsing ---------------------------------------------------------------------------

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _parse_call(body: str) -> tuple[str, str] | None:
    """(name, arguments as a JSON string) of one block's body, or None if it is not a call."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    head = _HEAD.match(body)
    if head is not None and isinstance(args, dict):
        _, end = json.JSONDecoder().raw_decode(body, head.end())
        return obj["name"], body[head.end():end]  # the model's own text, so streaming can send it as it comes
    if isinstance(args, str):
        try:
            if isinstance(json.loads(args), dict):
                return obj["name"], args
        except json.JSONDecodeError:
            pass
        return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ToolCallParser:
    """Splits model text into content and tool calls, incrementally.

    `feed(text)` -> (content to emit now, tool-call delta entries); `finish()` the same for what was
    held back. Whitespace next to a block is not content. A block whose JSON is not a call stays in
    the content verbatim (in streaming, unless its name and arguments had already started going out).
    """

    def __init__(self, stream: bool = True) -> None:
        self._stream = stream  # False: the whole text comes at once (no partial calls are announced)
        self._buf = ""  # text mode: not yet emitted (a possible start of <tool_call>)
        self._block: str | None = None  # call mode: the text since <tool_call>
        self._ws = ""  # trailing whitespace of the content, held until more content follows
        self._after_block = False
        self._index = -1  # index of the current / last call
        self._id = ""
        self._head_end: int | None = None  # where the arguments start in _block, once the name went out
        self._sent = 0  # characters of the arguments already sent
        self.calls: list[dict] = []  # complete calls, OpenAI message shape

    @property
    def num_calls(self) -> int:
        return len(self.calls)

    def feed(self, text: str) -> tuple[str, list[dict]]:
        content, deltas = "", []
        if self._block is None:
            self._buf += text
        else:
            self._block += text
        while True:
            if self._block is None:
                i = self._buf.find(TOOL_OPEN)
                if i < 0:
                    keep = _partial_suffix(self._buf, TOOL_OPEN)
                    content += self._content(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                content += self._content(self._buf[:i])
                self._ws, self._block, self._buf = "", self._buf[i + len(TOOL_OPEN):], ""
                self._index, self._id, self._head_end, self._sent = self._index + 1, new_call_id(), None, 0
            else:
                j = self._block.find(TOOL_CLOSE)
                if j < 0:
                    if self._stream:
                        deltas += self._progress()
                    break
                rest = self._block[j + len(TOOL_CLOSE):]
                text_out, new = self._close(self._block[:j], closed=True)
                content += text_out
                deltas += new
                self._block, self._buf = None, rest
        return content, _coalesce(deltas)

    def finish(self) -> tuple[str, list[dict]]:
        content, deltas = "", []
        if self._block is not None:  # an unclosed block at the end: a call if its JSON is complete
            text_out, deltas = self._close(self._block, closed=False)
            content += text_out
            self._block = None
        else:
            content += self._content(self._buf)
            self._buf = ""
        if not self._after_block:
            content += self._ws
        self._ws = ""
        return content, _coalesce(deltas)

    # -- internals

    def _content(self, s: str) -> str:
        if self._after_block:
            s = s.lstrip()
            if not s:
                return ""
            self._after_block = False
        body = s.rstrip()
        if not body:
            self._ws += s
            return ""
        out = self._ws + body
        self._ws = s[len(body):]
        return out

    def _progress(self) -> list[dict]:
        """Streams what is certain of the open block: the name, then the arguments but their last `}`."""
        block = self._block or ""
        out = []
        if self._head_end is None:
            head = _HEAD.match(block)
            if head is None or not block[head.end():].startswith("{"):
                return []
            self._head_end = head.end()
            name = json.loads(f'"{head.group(1)}"')
            out.append({"index": self._index, "id": self._id, "type": "function",
                        "function": {"name": name, "arguments": ""}})
        args = block[self._head_end:]
        last = args.rfind("}")
        safe = len(args[:last].rstrip()) if last >= 0 else len(args)
        if safe > self._sent:
            out.append({"index": self._index, "function": {"arguments": args[self._sent:safe]}})
            self._sent = safe
        return out

    def _close(self, body: str, closed: bool) -> tuple[str, list[dict]]:
        parsed = _parse_call(body.strip())
        if parsed is None:
            if self._head_end is not None:  # streaming, already announced: it ends with what was sent
                sent = (self._block or "")[self._head_end:][: self._sent]
                self.calls.append(self._call(self._pending_name, sent))
                self._after_block, self._ws = True, ""
                return "", []
            self._index -= 1  # not a call: the block is content, verbatim
            return self._content(TOOL_OPEN + body + (TOOL_CLOSE if closed else "")), []
        name, args = parsed
        self._after_block, self._ws = True, ""
        self.calls.append(self._call(name, args))
        if self._head_end is None:
            return "", [{"index": self._index, "id": self._id, "type": "function",
                         "function": {"name": name, "arguments": args}}]
        streamed = (self._block or "")[self._head_end:][: self._sent]
        rest = args[len(streamed):] if args.startswith(streamed) else ""
        return "", [{"index": self._index, "function": {"arguments": rest}}] if rest else []

    @property
    def _pending_name(self) -> str:
        head = _HEAD.match(self._block or "")
        return json.loads(f'"{head.group(1)}"') if head else ""

    def _call(self, name: str, args: str) -> dict:
        return {"id": self._id, "type": "function", "function": {"name": name, "arguments": args}}


def _coalesce(deltas: list[dict]) -> list[dict]:
    """One entry per call index (the header and the first argument piece travel together)."""
    out: list[dict] = []
    for d in deltas:
        if out and out[-1]["index"] == d["index"]:
            prev = out[-1]
            fn = dict(prev.get("function", {}))
            fn["arguments"] = fn.get("arguments", "") + d.get("function", {}).get("arguments", "")
            out[-1] = {**prev, "function": fn}
        else:
            out.append(d)
    return out


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a whole model answer. Without calls the content is the text unchanged."""
    parser = ToolCallParser(stream=False)
    content, _ = parser.feed(text)
    tail, _ = parser.finish()
    if not parser.calls:
        return text, []
    content += tail
    return (content if content.strip() else None), parser.calls


# ---- response shapes --------------------------------------------------------------------------


def chat_output(result: ChoiceResult, plan: ToolPlan | None) -> dict[str, Any]:
    """A non-streaming choice's `message` and `finish_reason`."""
    if plan is None or not plan.parse:
        return {"message": {"role": "assistant", "content": result.text}, "finish_reason": result.finish_reason}
    content, calls = parse_tool_calls(result.text)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    finish = "tool_calls" if calls and result.finish_reason == "stop" else result.finish_reason
    return {"message": message, "finish_reason": finish}


@dataclass
class ToolTextDelta(TextDelta):
    tool_calls: list[dict] | None = None


async def stream_tool_calls(deltas: AsyncIterator[TextDelta]) -> AsyncIterator[TextDelta]:
    """Re-cuts one choice's text deltas into content + `tool_calls` deltas (other fields pass through)."""
    parser = ToolCallParser()
    try:
        async for d in deltas:
            if d.finish_reason == "error":
                yield d
                return
            text, calls = parser.feed(d.text)
            finish = d.finish_reason
            if finish is not None:
                more_text, more_calls = parser.finish()
                text, calls = text + more_text, _coalesce(calls + more_calls)
                if finish == "stop" and parser.num_calls:
                    finish = "tool_calls"
            values = {f.name: getattr(d, f.name) for f in fields(d) if f.name != "tool_calls"}
            yield ToolTextDelta(**{**values, "text": text, "finish_reason": finish}, tool_calls=calls or None)
    finally:
        await deltas.aclose()


def chat_delta(d: TextDelta) -> dict[str, Any]:
    """The `delta` of a streamed chat chunk: content and/or tool_calls."""
    delta: dict[str, Any] = {}
    if d.text:
        delta["content"] = d.text
    calls = getattr(d, "tool_calls", None)
    if calls:
        delta["tool_calls"] = calls
    return delta
