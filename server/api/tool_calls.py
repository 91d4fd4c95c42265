"""Reading tool calls back from a model's output, whole or streamed alike, in the one call format
:mod:`server.api.tools` teaches and its grammar forces (``<tool_call>{...}</tool_call>``, newline-separated).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from server.api.tools import CALL_CLOSE, CALL_OPEN, CALL_SEPARATOR, ToolChoice


def _object_end(text: str, start: int) -> int | None:
    """The index just past the JSON object that opens at ``text[start]``, or None if it has not closed yet."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class CallParser:
    """One choice's output, fed as it comes, as OpenAI deltas: ``{"content": ...}`` for text, one
    ``{"tool_calls": [...]}`` per call once it is complete (a call is never sent half-formed). Text is passed
    through at once; in ``auto`` its first character says whether the output is text or calls."""

    choice: ToolChoice
    calls: list[dict] = field(default_factory=list)  # complete calls, in OpenAI's message shape
    _buffer: str = ""  # call text not yet read
    _text: bool | None = None  # the output is plain text (decided by its first character)
    _content: bool = False  # anything was sent as content

    def feed(self, text: str) -> list[dict]:
        if self._text is None and text:
            self._text = not self.choice.active or (self.choice.mode == "auto" and not text.startswith("<"))
        if self._text:
            return self._say(text)
        self._buffer += text
        deltas = []
        while True:
            rest = self._buffer.lstrip(CALL_SEPARATOR)
            if not rest.startswith(CALL_OPEN):
                break
            start = len(CALL_OPEN)
            end = _object_end(rest, start) if rest[start:start + 1] == "{" else None
            if end is None or len(rest) < end + len(CALL_CLOSE):
                break  # not complete yet (or not a call: :meth:`finish` sends it as content)
            call = self._read(rest[start:end]) if rest[end:end + len(CALL_CLOSE)] == CALL_CLOSE else None
            if call is None:
                break
            self._buffer = rest[end + len(CALL_CLOSE):]
            deltas.append({"tool_calls": [{"index": len(self.calls), **call}]})
            self.calls.append(call)
        return deltas

    def _read(self, body: str) -> dict | None:
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        names = {tool.name for tool in self.choice.callable}
        if not (isinstance(obj, dict) and obj.keys() == {"name", "arguments"} and obj["name"] in names
                and isinstance(obj["arguments"], dict)):
            return None
        arguments = json.dumps(obj["arguments"], ensure_ascii=False, separators=(",", ":"))
        return {"id": new_call_id(), "type": "function",
                "function": {"name": obj["name"], "arguments": arguments}}

    def _say(self, text: str) -> list[dict]:
        self._content = self._content or bool(text)
        return [{"content": text}] if text else []

    def finish(self) -> list[dict]:
        """What is left once generation ended (text that is not a complete call), as content."""
        rest, self._buffer = self._buffer, ""
        if not self.calls or rest.strip(CALL_SEPARATOR):
            return self._say(rest)
        return []

    def finish_reason(self, engine_reason: str) -> str:
        """``tool_calls`` when the output was calls and nothing else; the engine's reason otherwise."""
        return "tool_calls" if self.calls and not self._content else engine_reason

    def message(self, text: str, engine_reason: str) -> tuple[dict, str]:
        """A whole choice's ``message`` and ``finish_reason``, as its stream would have said them: the
        complete calls, and any other text (a call ``max_tokens`` cut short) as content."""
        deltas = self.feed(text) + self.finish()
        content = "".join(d["content"] for d in deltas if "content" in d)
        message: dict[str, object] = {"role": "assistant",
                                      "content": content if self._content or not self.calls else None}
        if self.calls:
            message["tool_calls"] = self.calls
        return message, self.finish_reason(engine_reason)
