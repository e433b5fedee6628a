"""Tool calls: the one parser for streamed and whole outputs, call ids, and client ids in the history.

The engine marks where the `[TOOL_CALLS]` token (found by id, never by text) occurred in the output text;
what follows is a JSON array of `{"name": ..., "arguments": {...}}`. ToolCallParser is fed that text in any
pieces and reports each call's name as soon as it is known, then its arguments text fragment by fragment;
fed everything at once, it gives the same calls.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from dataclasses import dataclass, field

_ALNUM = string.ascii_letters + string.digits
_VALID_ID = re.compile(r"[a-zA-Z0-9]{9}")
_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def new_call_id() -> str:
    """A fresh id of the form the model was trained on: 9 alphanumerics."""
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None           # set on a call's first delta, with its name
    name: str | None = None
    arguments: str = ""             # the next piece of the arguments' JSON text


@dataclass
class ToolCallParser:
    text: str = ""
    ids: list[str] = field(default_factory=list)
    _names: list[str] = field(default_factory=list)
    _sent: list[int] = field(default_factory=list)     # argument characters already reported, per call
    _done: int = 0                                      # calls already reported complete

    def feed(self, text: str) -> list[ToolCallDelta]:
        self.text += text
        out = []
        for index, (name, args, _) in enumerate(self._scan()):
            if index == len(self._names):
                self._names.append(name)
                self.ids.append(new_call_id())
                self._sent.append(0)
                out.append(ToolCallDelta(index, self.ids[index], name))
            if len(args) > self._sent[index]:
                out.append(ToolCallDelta(index, arguments=args[self._sent[index]:]))
                self._sent[index] = len(args)
        return out

    def _scan(self):
        """(name, arguments text so far, complete?) for each call whose name is complete."""
        pos = 0
        while (m := _CALL_HEAD.search(self.text, pos)) is not None:
            name = json.loads(f'"{m.group(1)}"')
            end = _value_end(self.text, m.end())
            if end is None:
                yield name, self.text[m.end():], False
                return
            yield name, self.text[m.end():end], True
            pos = end

    def newly_complete(self) -> list[dict]:
        """Calls whose arguments completed since the last call of this method (after `feed`)."""
        done = self.complete_calls()
        new, self._done = done[self._done:], len(done)
        return new

    def complete_calls(self) -> list[dict]:
        """Every call whose arguments are a complete JSON object, in order: [{id, name, arguments (dict),
        arguments_text (exactly as generated: what the streamed fragments add up to)}]. A call cut off (by
        max_tokens) and anything after it are not among them."""
        self.feed("")
        calls = []
        for index, (name, args, complete) in enumerate(self._scan()):
            try:
                value = json.loads(args) if complete else None
            except json.JSONDecodeError:
                value = None
            if not isinstance(value, dict):
                break
            calls.append({"id": self.ids[index], "name": name, "arguments": value, "arguments_text": args})
        return calls

    @property
    def closed(self) -> bool:
        """Whether the text is a whole JSON array of {name, arguments} objects (nothing was cut off)."""
        try:
            parsed = json.loads(self.text)
        except json.JSONDecodeError:
            return False
        return isinstance(parsed, list) and len(parsed) == len(self.complete_calls())


def _value_end(text: str, start: int) -> int | None:
    """Index just past the JSON value starting at text[start], or None if it is not complete yet."""
    depth, in_str, esc, i = 0, False, False, start
    while i < len(text):
        c = text[i]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
                if depth == 0:
                    return i + 1
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
            if depth < 0:
                return i
        elif c == "," and depth == 0:
            return i
        i += 1
    return None


def normalize_tool_call_ids(messages: list) -> list:
    """Client ids -> the model's 9-alphanumeric ids, consistently within the request.

    Valid ids (including the hosted fallback 000000001) stay; any other id (e.g. OpenAI's `call_...`) maps to
    a deterministic 9-character id, the same for the assistant call and the tool result that answers it. Calls
    without an id get one, and tool results without `tool_call_id` answer the open calls in order."""
    if not isinstance(messages, list):
        return messages
    mapping: dict[str, str] = {}
    used: set[str] = set()

    def mapped(cid: str) -> str:
        if cid in mapping:
            return mapping[cid]
        new = cid if _VALID_ID.fullmatch(cid) else _hash_id(cid)
        while new in used and not _VALID_ID.fullmatch(cid):
            new = _hash_id(new)
        mapping[cid] = new
        used.add(new)
        return new

    out, pending = [], []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            out.append(msg)
            continue
        msg = dict(msg)
        if msg.get("role") == "assistant" and isinstance(msg.get("tool_calls"), list):
            calls = []
            for k, call in enumerate(msg["tool_calls"]):
                if isinstance(call, dict):
                    call = dict(call)
                    cid = call.get("id")
                    call["id"] = mapped(cid if isinstance(cid, str) and cid else f"auto-{i}-{k}")
                    pending.append(call["id"])
                calls.append(call)
            msg["tool_calls"] = calls
        elif msg.get("role") == "tool":
            cid = msg.get("tool_call_id")
            if isinstance(cid, str) and cid:
                msg["tool_call_id"] = mapped(cid)
            elif pending:
                msg["tool_call_id"] = pending[0]
            if msg.get("tool_call_id") in pending:
                pending.remove(msg["tool_call_id"])
        out.append(msg)
    return out


def _hash_id(cid: str) -> str:
    digest = int.from_bytes(hashlib.sha256(cid.encode()).digest()[:8], "big")
    chars = []
    for _ in range(9):
        digest, r = divmod(digest, 62)
        chars.append(_ALNUM[r])
    return "".join(chars)
