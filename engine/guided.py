"""Grammar-constrained decoding with llguidance: JSON schemas, json_object, and tool-call grammars.

A request's grammar is an llguidance grammar string (compiled here from a JSON schema or our Lark); the
engine gives it an LLMatcher that, every step, yields the bitmask of tokens allowed next and consumes the
sampled token. Small 3.1 is a v7 model, so mistral-common's grammar factory (v11+ only) does not apply:
its tool calls are `[TOOL_CALLS]` followed by a JSON array of `{"name": ..., "arguments": {...}}`.
"""

from __future__ import annotations

import json
from functools import lru_cache

import llguidance as llg
import torch
from jsonschema.validators import validator_for

from engine.tokenizer import Tokenizer

TOOL_CALLS_ID = 9
# compact JSON unless a schema's own "x-guidance" asks otherwise
JSON_OPTIONS = {"whitespace_flexible": False}

# RFC 3339 dates and times as JSON Schema validators check them. llguidance's own `date`, `time` and
# `date-time` formats also accept Feb 29 of any year, year 0000 and second 60, which validators reject.
_YEAR = "(?:000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})"
_LEAP = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (f"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
         f"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{_LEAP}-02-29)")
_TIME = "(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]{1,9})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_FORMATS = {"date": f"^{_DATE}$", "time": f"^{_TIME}$", "date-time": f"^{_DATE}T{_TIME}$"}
_DATA_KEYS = {"const", "enum", "default", "examples"}       # values, not schemas: never rewritten


def _strict_formats(node):
    """A copy of a schema with date/time formats replaced by exact patterns (where no pattern is set)."""
    if isinstance(node, list):
        return [_strict_formats(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: v if k in _DATA_KEYS else _strict_formats(v) for k, v in node.items()}
    if isinstance(out.get("format"), str) and out["format"] in _FORMATS and "pattern" not in out:
        out["pattern"] = _FORMATS[out.pop("format")]
    return out


class GrammarError(ValueError):
    """The schema or tool definitions cannot be compiled into a grammar."""


class GrammarCompiler:
    """Compiles grammars against the model's vocabulary (the llguidance tokenizer is built once)."""

    def __init__(self, tokenizer: Tokenizer):
        from mistral_common.guidance.tokenizer import from_mistral_tokenizer

        self.llg_tokenizer = from_mistral_tokenizer(tokenizer.mistral)
        self._cache = lru_cache(maxsize=256)(self._validate)

    def _validate(self, grammar: str) -> str:
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.llg_tokenizer)
        if is_error:
            raise GrammarError(f"the schema cannot be used for constrained decoding: {messages[0]}")
        return grammar

    def json_schema(self, schema: dict | bool) -> str:
        """Grammar for one JSON value matching `schema` (a JSON Schema object)."""
        if not isinstance(schema, dict):
            raise GrammarError("a JSON schema must be an object")
        try:
            validator_for(schema).check_schema(schema)
        except Exception as e:       # jsonschema.SchemaError
            raise GrammarError(f"invalid JSON schema: {getattr(e, 'message', e)}") from None
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(_strict_formats(schema)),
                                                             defaults=JSON_OPTIONS)
        except ValueError as e:
            raise GrammarError(f"invalid JSON schema: {e}") from None
        return self._cache(grammar)

    def json_object(self) -> str:
        return self.json_schema({"type": "object"})

    def tool_calls(self, tools: list[dict], choice: str | None = "auto", parallel: bool = True) -> str:
        """tools: [{name, parameters}] (OpenAI `function` objects). choice: "auto" (text, or calls), "required"
        (calls), "none" (text only, [TOOL_CALLS] impossible) or a tool name (calls of that tool only)."""
        if choice == "none":
            return self._cache(llg.LLMatcher.grammar_from_lark("start: TEXT\nTEXT: /(.|\\n)+/\n"))
        if choice not in ("auto", "required"):
            tools = [t for t in tools if t["name"] == choice]
            if not tools:
                raise GrammarError(f"tool_choice names {choice!r}, which is not among the tools")
        calls = []
        for t in tools:
            params = _strict_formats(dict(t.get("parameters") or {"type": "object", "properties": {}}))
            # arguments the tool did not declare are never useful: close the object unless the schema opens it
            if params.get("type") == "object" and "additionalProperties" not in params:
                params["additionalProperties"] = False
            calls.append({"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": params},
                          "required": ["name", "arguments"], "additionalProperties": False})
        array = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1,
                 "x-guidance": JSON_OPTIONS}
        if not parallel:
            array["maxItems"] = 1
        body = f"calls: <[{TOOL_CALLS_ID}]> %json {json.dumps(array)}\n"
        start = "start: calls\n" if choice != "auto" else "start: TEXT | calls\nTEXT: /(.|\\n)+/\n"
        return self._cache(llg.LLMatcher.grammar_from_lark(start + body))

    def matcher(self, grammar: str) -> llg.LLMatcher:
        m = llg.LLMatcher(self.llg_tokenizer, grammar, log_level=0)
        if m.is_error():
            raise GrammarError(f"grammar error: {m.get_error()}")
        return m


def fill_bitmask(matchers: list[llg.LLMatcher], vocab_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """[len(matchers), ceil(V/32)] int32 bitmask of the tokens each matcher allows next, in host memory:
    written into `out` (contiguous, e.g. a pinned staging buffer) when given."""
    words = (vocab_size + 31) // 32
    mask = torch.empty((len(matchers), words), dtype=torch.int32) if out is None else out
    if mask.shape != (len(matchers), words) or mask.dtype != torch.int32 or not mask.is_contiguous():
        raise ValueError(f"the bitmask buffer must be a contiguous int32 [{len(matchers)}, {words}] tensor")
    for i, m in enumerate(matchers):
        m.unsafe_compute_mask_ptr(mask[i].data_ptr(), words * 4)
    return mask


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits[rows[i]] keeps only the tokens set in bitmask[i]; portable (CPU and CUDA, no compile)."""
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32, device=bitmask.device)) & 1
    allowed = bits.bool().flatten(1)[:, :logits.shape[1]]
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
