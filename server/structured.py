"""Tools and structured output at the HTTP edge: validating tools and schemas, building grammars, and
splitting an output into content and tool calls (the same splitter for streams and whole answers)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from engine.guided import GrammarError
from engine.tool_calls import ToolCallDelta, ToolCallParser
from server.errors import bad_input


def parse_tools(tools) -> list[dict] | None:
    """Workers native {name, description, parameters} or OpenAI {type: function, function: {...}} ->
    [{name, description, parameters}]."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad_input("'tools' must be an array", "tools")
    out = []
    for k, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_input(f"'/tools/{k}' must be a function with a name", "tools")
        if isinstance(tool, dict) and tool.get("type", "function") != "function":
            raise bad_input(f"'/tools/{k}': unsupported tool type {tool.get('type')!r}", "tools")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad_input(f"'/tools/{k}/parameters' must be a JSON schema object", "tools")
        out.append({"name": fn["name"], "description": fn.get("description", ""), "parameters": params})
    names = [t["name"] for t in out]
    if len(set(names)) != len(names):
        raise bad_input("tool names must be unique", "tools")
    return out or None


def tool_choice(choice, tools: list[dict] | None) -> str | None:
    """OpenAI's / Workers' tool_choice -> "auto" | "none" | "required" | a tool's name; None without tools."""
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_input('tool_choice must be "auto", "none", "required" or '
                            '{"type": "function", "function": {"name": ...}}', "tool_choice")
        choice = fn["name"]
    elif choice is not None and choice not in ("auto", "none", "required"):
        raise bad_input(f"tool_choice {choice!r} is not one of auto, none, required or a named function",
                        "tool_choice")
    if tools is None:
        if choice not in (None, "auto", "none"):
            raise bad_input(f"tool_choice {choice!r} needs tools", "tool_choice")
        return None
    if choice not in (None, "auto", "none", "required") and choice not in [t["name"] for t in tools]:
        raise bad_input(f"tool_choice names {choice!r}, which is not among the tools", "tool_choice")
    return choice or "auto"


def response_schema(response_format, guided_json=None) -> dict | None:
    """The JSON schema a request asks its answer to match: `guided_json` (Workers), or `response_format`
    json_object / json_schema (a bare schema, or OpenAI's {name, schema, strict} wrapper)."""
    if guided_json is not None:
        if not isinstance(guided_json, dict):
            raise bad_input("'/guided_json' must be a JSON schema object", "guided_json")
        return guided_json
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise bad_input("'response_format' must be an object", "response_format")
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
            return spec["schema"]             # OpenAI's wrapper
        if isinstance(spec, dict):
            return spec                       # Workers AI: the bare schema
        raise bad_input("response_format.json_schema must hold a JSON schema", "response_format")
    raise bad_input(f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                    "response_format")


def compile_grammar(engine, schema: dict | None, tools: list[dict] | None, choice="auto",
                    parallel: bool = True) -> str | None:
    if schema is not None and tools is not None and choice != "none":
        raise bad_input("a JSON response format and tools cannot be combined; use one or the other",
                        "response_format")
    try:
        if schema is not None:
            return engine.grammars.json_schema(schema)
        if tools is not None:
            return engine.grammars.tool_calls(tools, choice, parallel)
    except GrammarError as e:
        raise bad_input(str(e), "response_format" if schema is not None else "tools") from None
    return None


@dataclass
class OutputSplitter:
    """Splits a request's growing output into content (text before [TOOL_CALLS]) and tool-call deltas."""
    tools: bool
    parser: ToolCallParser = field(default_factory=ToolCallParser)
    _content_sent: int = 0

    def update(self, out) -> tuple[str, list[ToolCallDelta]]:
        offset = out.tool_calls_offset if self.tools else None
        end = len(out.text) if offset is None else min(offset, len(out.text))
        content = out.text[self._content_sent:end]
        self._content_sent = max(self._content_sent, end)
        deltas = []
        if offset is not None and len(out.text) > offset:
            deltas = self.parser.feed(out.text[offset + len(self.parser.text):])
        return content, deltas

    @property
    def has_calls(self) -> bool:
        return bool(self.parser.ids)

    def calls(self) -> list[dict]:
        """Complete calls [{id, name, arguments (dict), arguments_text}]; ValueError when cut off."""
        calls = self.parser.calls()
        texts = self.parser.argument_texts()
        for c, t in zip(calls, texts):
            c["arguments_text"] = t
        return calls


def parse_json_answer(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None
