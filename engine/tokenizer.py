"""Tekken v7 tokenizer of Mistral Small 3.1: chat / raw prompt encoding and streaming detokenization.

mistral-common is the source of truth for the chat template (model.md §4); this module only turns
Workers AI / OpenAI message dicts into mistral-common objects, loads images through our own safe
decoder (mistral-common would fetch http URLs) and turns every validation failure into PromptError.

Chat requests are validated in mistral-common's *serving* mode, i.e. for generation: the last message
must be user or tool, or an assistant message with ``"prefix": true`` (continued by the model); every
assistant tool call must be answered by a tool message; tool-call ids must be 9 alphanumerics.
"""
from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mistral_common
import numpy as np
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, TokenizerVersion
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer
from pydantic import ValidationError

from engine.config import ImageConfig

# Vision settings of Mistral Small 3.1 (Pixtral-12B's bundled file has 16 / 1024 and no merge), as tekken.json
# spells them.
_IMAGE = ImageConfig()
V7_IMAGE_CONFIG = {"image_patch_size": _IMAGE.patch_size, "max_image_size": _IMAGE.max_image_size,
                   "spatial_merge_size": _IMAGE.spatial_merge_size}
# Serving-mode validation insists on request.model; the value itself never reaches the tokens.
_MODEL_NAME = "mistral-small-3.1-24b-instruct"
# mistral-common joins adjacent text chunks with this; flattening system parts the same way keeps ids equal.
_CHUNK_JOIN = "\n\n"
_ROLES = ("system", "developer", "user", "assistant", "tool")


class PromptError(ValueError):
    """The request cannot be turned into a prompt (bad shape, or rejected by mistral-common's validator)."""


@dataclass
class EncodedPrompt:
    token_ids: list[int]
    images: list[np.ndarray] = field(default_factory=list)  # CHW float32, normalised, in prompt order


def write_tekken_v7(path: str | Path) -> Path:
    """Write mistral-common's bundled Pixtral tekken_240911.json rebuilt as Small 3.1's v7 tokenizer.

    Stand-in for the real tekken.json (not downloadable here): same BPE table and special ids, v7
    template, 14 px patches / 1540 px max / 2x2 merge. A directory (any path not ending in .json) gets
    ``tekken.json`` inside; mistral-common only treats ``*tekken*.json`` files as Tekken.
    """
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":
        path = path / "tekken.json"
    src = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    data = json.loads(src.read_text(encoding="utf-8"))
    data["config"]["version"] = "v7"
    data.pop("multimodal", None)  # legacy key name; "image" is the one the loader reads first
    data["image"] = dict(V7_IMAGE_CONFIG)
    # Explicit special-token list, as in real v7+ files: ids 0-19 named, 20-999 <SPECIAL_n> fillers.
    named = [dict(t) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    n_special = data["config"]["default_num_special_tokens"]
    fillers = [{"rank": i, "token_str": Tekkenizer.SPECIAL_TOKEN_TEMPLATE.format(id=i), "is_control": True}
               for i in range(len(named), n_special)]
    data["special_tokens"] = named + fillers
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


class Tokenizer:
    """Mistral Small 3.1 tokenizer: a MistralTokenizer (InstructTokenizerV7 + Tekkenizer) plus our I/O."""

    def __init__(self, mistral: MistralTokenizer):
        self.mistral = mistral
        self.tekken: Tekkenizer = mistral.instruct_tokenizer.tokenizer
        if not isinstance(self.tekken, Tekkenizer) or self.tekken.version != TokenizerVersion.v7:
            # Other versions lay the template out differently (v3: no [SYSTEM_PROMPT], v11: tool syntax).
            raise ValueError(f"expected the Tekken v7 tokenizer of Mistral Small 3.1, "
                             f"got {self.tekken.version}")
        # Every special token by its string ("<s>", "[INST]", "<SPECIAL_42>", ...), for raw mode.
        self._special_by_str = {self.tekken.id_to_piece(i): i for i in sorted(self.tekken.special_ids)}
        alternatives = sorted(self._special_by_str, key=len, reverse=True)  # longest match first
        self._special_re = re.compile("|".join(re.escape(s) for s in alternatives))

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        if "tekken" not in path.name or path.suffix != ".json":
            raise ValueError(f"{path}: mistral-common only loads Tekken files named '*tekken*.json'")
        return cls(MistralTokenizer.from_file(str(path), mode=ValidationMode.serving))

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> Tokenizer:
        path = Path(model_dir) / "tekken.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: the model directory needs tekken.json (the Tekken v7 tokenizer "
                "file of Mistral-Small-3.1-24B-Instruct-2503; tests can build one with write_tekken_v7)")
        return cls.from_file(path)

    # ---- vocabulary (ids as in model.md §4) ----
    vocab_size = property(lambda self: self.tekken.n_words)  # 131072
    bos_id = property(lambda self: self.tekken.bos_id)  # 1
    eos_id = property(lambda self: self.tekken.eos_id)  # 2, the stop token
    image_token_id = property(lambda self: self.tekken.get_special_token("[IMG]"))  # 10
    image_break_id = property(lambda self: self.tekken.get_special_token("[IMG_BREAK]"))  # 12
    image_end_id = property(lambda self: self.tekken.get_special_token("[IMG_END]"))  # 13
    # All special ids (0..999); none of them ever produces text when decoding with skip_special.
    control_token_ids = property(lambda self: frozenset(self.tekken.special_ids))

    # ---- encoding ----
    def encode_text(self, text: str) -> list[int]:
        """Plain BPE, no BOS/EOS; control-token strings in ``text`` stay ordinary text."""
        return self.tekken.encode(text, bos=False, eos=False)

    def encode_raw(self, prompt: str) -> list[int]:
        """Raw mode: the prompt is used verbatim and the caller owns the format.

        No BOS is added: write ``<s>`` yourself. Every special-token string (``<s>``, ``</s>``,
        ``[INST]``, ``[IMG]``, ...) becomes its control id; the text between them is BPE-encoded.
        """
        if not isinstance(prompt, str):
            raise PromptError(f"prompt must be a string, got {type(prompt).__name__}")
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(prompt):
            ids += self.encode_text(prompt[pos:m.start()])
            ids.append(self._special_by_str[m.group()])
            pos = m.end()
        return ids + self.encode_text(prompt[pos:])

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> EncodedPrompt:
        """Encode a Workers AI / OpenAI chat request exactly as mistral-common's v7 template does."""
        from engine.tool_calls import normalize_tool_call_ids

        converted, converted_tools = _convert_messages(normalize_tool_call_ids(messages)), _convert_tools(tools)
        try:
            request = ChatCompletionRequest(messages=converted, tools=converted_tools, model=_MODEL_NAME)
            tokenized = self.mistral.encode_chat_completion(request)
        except (MistralCommonException, ValueError, AssertionError, TypeError) as e:
            raise PromptError(f"invalid chat request: {_describe(e)}") from e
        return EncodedPrompt(token_ids=list(tokenized.tokens), images=list(tokenized.images))

    def token_bytes(self, token_id: int) -> bytes:
        """A token's bytes (control tokens as their name), e.g. for OpenAI logprobs' `bytes`."""
        return self.tekken.id_to_byte_piece(int(token_id), SpecialTokenPolicy.KEEP)

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        policy = SpecialTokenPolicy.IGNORE if skip_special else SpecialTokenPolicy.KEEP
        return self.tekken.decode(list(ids), special_token_policy=policy)


class IncrementalDetokenizer:
    """Streaming detokenizer: ``push`` one id at a time, get the newly completed text.

    Tekken tokens are byte sequences that may end inside a UTF-8 character (emoji, CJK); the pending
    bytes are held by an incremental UTF-8 decoder until the character completes, so no chunk carries
    a broken character. Invalid bytes become U+FFFD exactly as a whole-sequence ``decode`` would.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._tekken = tokenizer.tekken
        self._policy = SpecialTokenPolicy.IGNORE if skip_special else SpecialTokenPolicy.KEEP
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self._tekken.id_to_byte_piece(int(token_id), self._policy))

    def flush(self) -> str:
        """End of stream: an incomplete trailing character comes out as U+FFFD."""
        out = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return out


# ---- request conversion: Workers AI / OpenAI dicts -> mistral-common objects ----
def _convert_messages(messages: Any) -> list:
    if not isinstance(messages, list):
        raise PromptError(f"messages must be a list, got {type(messages).__name__}")
    if not messages:
        raise PromptError("messages must not be empty")
    out = []
    for i, msg in enumerate(messages):
        try:
            out.append(_convert_message(i, msg))
        except ValidationError as e:  # pydantic, from the message constructors (never an ImageError)
            raise PromptError(f"messages[{i}]: {_describe(e)}") from e
    return out


def _convert_message(i: int, msg: Any):
    if not isinstance(msg, dict):
        raise PromptError(f"messages[{i}] must be an object, got {type(msg).__name__}")
    role = msg.get("role")
    if role is None:
        raise PromptError(f"messages[{i}] has no role")
    if role not in _ROLES:
        raise PromptError(f"messages[{i}] has unknown role {role!r} "
                          "(expected system, user, assistant or tool)")
    where = f"messages[{i}] ({role})"
    content, tool_calls = msg.get("content"), msg.get("tool_calls")
    if content is None and not (role == "assistant" and tool_calls):
        raise PromptError(f"{where}: content is missing or null; only an assistant message with "
                          "tool_calls may leave it null")
    if role in ("system", "developer"):  # OpenAI's newer name for system, as mistral-common maps it
        chunks = _chunks(content, where, allow_images=False)
        text = chunks if isinstance(chunks, str) else _CHUNK_JOIN.join(c.text for c in chunks if c.text)
        return SystemMessage(content=text)
    if role == "user":
        return UserMessage(content=_chunks(content, where, allow_images=True))
    if role == "tool":
        name, call_id = msg.get("name"), msg.get("tool_call_id")
        content = _chunks(content, where, allow_images=False)
        return ToolMessage(content=content, tool_call_id=call_id, name=name)
    if tool_calls is not None and not isinstance(tool_calls, list):
        raise PromptError(f"{where}: tool_calls must be a list")
    calls = [_convert_tool_call(f"{where} tool_calls[{k}]", c) for k, c in enumerate(tool_calls or [])]
    return AssistantMessage(content=None if content is None else _chunks(content, where, allow_images=False),
                            tool_calls=calls or None, prefix=bool(msg.get("prefix", False)))


def _chunks(content: Any, where: str, allow_images: bool) -> str | list:
    """String content stays a string; parts (a list, or one part object as Workers allows) -> chunks."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        raise PromptError(f"{where}: content must be a string or a list of parts, "
                          f"got {type(content).__name__}")
    chunks: list = []
    for j, part in enumerate(content):
        pw = f"{where} content[{j}]"
        ptype = part.get("type") if isinstance(part, dict) else None
        if ptype == "text":
            if not isinstance(part.get("text"), str):
                raise PromptError(f"{pw}: a text part needs a string 'text'")
            chunks.append(TextChunk(text=part["text"]))
        elif ptype == "image_url":
            if not allow_images:
                raise PromptError(f"{pw}: images are only allowed in user messages")
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url  # {url: ...} or a bare string
            if not isinstance(url, str):
                raise PromptError(f"{pw}: an image_url part needs image_url.url (a data URI)")
            chunks.append(ImageChunk(image=_load_image(url, pw)))
        else:
            raise PromptError(f"{pw}: unsupported content part {ptype!r} (expected 'text' or 'image_url')")
    return chunks


def _load_image(url: str, where: str):
    # Our decoder refuses http(s) URLs, bombs and broken data; mistral-common never sees a URL.
    from engine.image_processor import ImageError, load_image

    try:
        return load_image(url)
    except ImageError as e:
        raise ImageError(f"{where}: {e}") from e


def _convert_tool_call(where: str, call: Any) -> ToolCall:
    """OpenAI ``{id, type, function: {name, arguments: "<json>"}}`` or Workers ``{name, arguments: {}}``."""
    if not isinstance(call, dict):
        raise PromptError(f"{where} must be an object")
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise PromptError(f"{where}: needs a function name")
    args = fn.get("arguments")
    if args is not None and not isinstance(args, (str, dict)):
        raise PromptError(f"{where}: arguments must be a JSON string or an object")
    extra = {} if call.get("id") is None else {"id": call["id"]}  # absent -> "null", refused when serving
    return ToolCall(function=FunctionCall(name=fn["name"], arguments=args), **extra)


def _convert_tools(tools: Any) -> list[Tool] | None:
    """OpenAI ``{type: "function", function: {...}}`` or Workers ``{name, description, parameters}``."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise PromptError(f"tools must be a list, got {type(tools).__name__}")
    out = []
    for k, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise PromptError(f"tools[{k}] must be a function tool with a name")
        if tool.get("type", "function") != "function":
            raise PromptError(f"tools[{k}]: unsupported tool type {tool.get('type')!r}")
        try:
            out.append(Tool(function=Function.from_openai(fn)))  # defaults description "" / parameters {}
        except ValidationError as e:
            raise PromptError(f"tools[{k}]: {_describe(e)}") from e
    return out


def _describe(e: BaseException) -> str:
    """One readable line: pydantic errors as 'loc: msg', others as their message."""
    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(map(str, x['loc'])) or 'value'}: {x['msg']}" for x in e.errors())
    return str(e) or type(e).__name__
