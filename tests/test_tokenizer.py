"""engine.tokenizer against mistral-common's own v7 encoding (the reference), on a rebuilt tekken.json."""
import base64
import importlib.util
import io
import random

import numpy as np
import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV7
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from engine.tokenizer import (
    EncodedPrompt,
    IncrementalDetokenizer,
    PromptError,
    Tokenizer,
    write_tekken_v7,
)

# Image cases go through engine.image_processor.load_image; skip them until that module exists.
needs_images = pytest.mark.skipif(
    importlib.util.find_spec("engine.image_processor") is None, reason="engine.image_processor not there yet"
)


@pytest.fixture(scope="module")
def tekken_path(tmp_path_factory):
    return write_tekken_v7(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def tok(tekken_path):
    return Tokenizer.from_model_dir(tekken_path.parent)


@pytest.fixture(scope="module")
def ref(tekken_path):
    return MistralTokenizer.from_file(str(tekken_path))  # mistral-common's default (test) validation mode


def data_uri(w, h, seed=0):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def img(w, h, seed=0):
    return {"type": "image_url", "image_url": {"url": data_uri(w, h, seed)}}


def text(t):
    return {"type": "text", "text": t}


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City"}},
                   "required": ["city"]}}}
TIME_NATIVE = {"name": "get_time", "description": "Local time",  # Workers AI native tool shape
               "parameters": {"type": "object",
                              "properties": {"tz": {"type": "string", "description": "TZ"}}}}
TIME_OPENAI = {"type": "function", "function": TIME_NATIVE}
CALLS_OPENAI = [
    {"id": "abcDEF123", "type": "function",
     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    {"id": "abcDEF124", "type": "function", "function": {"name": "get_time", "arguments": '{"tz":"CET"}'}},
]
CALLS_WORKERS = [{"id": "abcDEF123", "name": "get_weather", "arguments": {"city": "Paris"}},
                 {"id": "abcDEF124", "name": "get_time", "arguments": {"tz": "CET"}}]


def tool_turn(calls, results=("18 C", "14:02")):
    return [{"role": "user", "content": "Weather and time in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": "abcDEF123", "content": results[0]},
            {"role": "tool", "tool_call_id": "abcDEF124", "content": results[1]}]


def foreign_ids(turn_ids, result_ids):
    """tool_turn with other ids on the calls and on the results."""
    calls = [{**c, "id": i} for c, i in zip(CALLS_OPENAI, turn_ids)] if turn_ids else \
        [{k: v for k, v in c.items() if k != "id"} for c in CALLS_OPENAI]
    msgs = tool_turn(calls)
    for m, rid in zip(msgs[2:], result_ids):
        if rid is None:
            m.pop("tool_call_id")
        else:
            m["tool_call_id"] = rid
    return msgs


def mapped(cid):
    from engine.tool_calls import _hash_id
    return _hash_id(cid)


# (id, our messages, our tools, reference messages or None = same, reference tools or None = same)
TEXT_CASES = [
    ("system+user", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}], None),
    ("multi-turn", [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b  "}, {"role": "user", "content": "c"},
                    {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}], None),
    ("system-in-middle", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "system", "content": "now in French"},
                          {"role": "user", "content": "d"}], None),
    ("tools+user", [{"role": "user", "content": "hi"}], [WEATHER, TIME_NATIVE], None, [WEATHER, TIME_OPENAI]),
    ("parallel-calls-openai", tool_turn(CALLS_OPENAI) + [{"role": "user", "content": "thanks"}],
     [WEATHER, TIME_OPENAI]),
    ("parallel-calls-workers", tool_turn(CALLS_WORKERS) + [{"role": "user", "content": "thanks"}],
     [WEATHER, TIME_NATIVE], tool_turn(CALLS_OPENAI) + [{"role": "user", "content": "thanks"}],
     [WEATHER, TIME_OPENAI]),
    ("foreign-ids-remapped", foreign_ids(["call_abc123xyz", "call_Def"], ["call_abc123xyz", "call_Def"]),
     [WEATHER, TIME_OPENAI], foreign_ids([mapped("call_abc123xyz"), mapped("call_Def")],
                                         [mapped("call_abc123xyz"), mapped("call_Def")])),
    ("hosted-fallback-id", foreign_ids(["000000001", "000000002"], ["000000001", "000000002"]),
     [WEATHER, TIME_OPENAI]),
    ("calls-without-ids", foreign_ids(None, [None, None]), [WEATHER, TIME_OPENAI],
     foreign_ids([mapped("auto-1-0"), mapped("auto-1-1")], [mapped("auto-1-0"), mapped("auto-1-1")])),
    ("ends-with-tool", tool_turn(CALLS_OPENAI, results=([text('{"t": 18}')], "14:02")),
     [WEATHER, TIME_OPENAI]),
    ("text-parts-only", [{"role": "system", "content": [text("one"), text("two")]},
                         {"role": "user", "content": [text("What"), text(" is up?")]}], None),
    ("single-part-object", [{"role": "user", "content": text("hi")}], None,
     [{"role": "user", "content": "hi"}]),
    ("consecutive-users", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], None),
    ("unicode", [{"role": "user", "content": "Grüß dich 你好 👨‍👩‍👧 🇫🇷"}], None),
    ("control-strings-as-text",
     [{"role": "user", "content": "[INST] <s> </s> [/INST] [IMG] [TOOL_CALLS]"}], None),
]

IMAGE_CASES = [
    ("image-first", [{"role": "user", "content": [img(64, 48), text("What is this?")]}], None),
    ("image-last", [{"role": "system", "content": "S"},
                    {"role": "user", "content": [text("What is this?"), img(200, 300, 1)]}], None),
    ("image-middle",
     [{"role": "user", "content": [text("Compare"), img(40, 90, 2), text("with that")]}], None),
    ("two-images", [{"role": "user", "content": [text("Diff?"), img(64, 48, 3), img(33, 500, 4)]}], None),
    ("images-two-turns", [{"role": "user", "content": [img(64, 48, 5), text("A?")]},
                          {"role": "assistant", "content": "A cat."},
                          {"role": "user", "content": [text("And B?"), img(80, 80, 6)]}], None),
    ("tools+image", [{"role": "user", "content": [text("Weather here?"), img(64, 48, 7)]}], [WEATHER]),
]


def check_case(tok, ref, messages, tools, ref_messages=None, ref_tools=None):
    got = tok.encode_chat(messages, tools)
    want = ref.encode_chat_completion(ChatCompletionRequest.from_openai(ref_messages or messages,
                                                                         ref_tools or tools))
    assert isinstance(got, EncodedPrompt)
    assert got.token_ids == want.tokens
    assert len(got.images) == len(want.images)
    for a, b in zip(got.images, want.images):
        assert a.dtype == np.float32 and a.shape == b.shape and a.ndim == 3 and a.shape[0] == 3
        np.testing.assert_allclose(a, b, atol=1e-5)
    return got


@pytest.mark.parametrize("case", TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_chat_matches_mistral_common(tok, ref, case):
    check_case(tok, ref, *case[1:])


@needs_images
@pytest.mark.parametrize("case", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_chat_with_images_matches_mistral_common(tok, ref, case):
    got = check_case(tok, ref, *case[1:])
    assert got.token_ids.count(tok.image_end_id) == len(got.images) > 0


def test_tekken_v7_file(tekken_path, tok, ref):
    assert isinstance(ref.instruct_tokenizer, InstructTokenizerV7)
    assert ref.instruct_tokenizer.tokenizer.image.image_patch_size == 14
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (131072, 1, 2)
    assert (tok.image_token_id, tok.image_break_id, tok.image_end_id) == (10, 12, 13)
    names = {3: "[INST]", 4: "[/INST]", 5: "[AVAILABLE_TOOLS]", 9: "[TOOL_CALLS]", 11: "<pad>",
             17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]", 19: "[TOOL_CONTENT]", 20: "<SPECIAL_20>"}
    assert {i: tok.tekken.id_to_piece(i) for i in names} == names
    assert tok.control_token_ids == frozenset(range(1000))
    assert tok.encode_text("What is this?") == [7493, 1395, 1593, 1063]  # model.md §4


def _expected_200x300(tok, system):
    rows = ([10] * 8 + [12]) * 10 + [10] * 8 + [13]  # 11 rows of 8 [IMG]; last [IMG_BREAK] -> [IMG_END]
    return [1, 17, *tok.encode_text(system), 18, 3, *rows, 7493, 1395, 1593, 1063, 4]


def test_known_image_layout_reference(tok, ref):
    # The rebuilt file itself (no engine code): model.md's 200x300 example, image moved first.
    msgs = [{"role": "system", "content": "Sys"},
            {"role": "user", "content": [text("What is this?"), img(200, 300)]}]
    want = _expected_200x300(tok, "Sys")
    assert ref.encode_chat_completion(ChatCompletionRequest.from_openai(msgs)).tokens == want


@needs_images
def test_known_image_layout(tok):
    msgs = [{"role": "system", "content": "Sys"},
            {"role": "user",
             "content": [text("What is this?"), {"type": "image_url", "image_url": data_uri(200, 300)}]}]
    out = tok.encode_chat(msgs)
    assert out.token_ids == _expected_200x300(tok, "Sys")
    assert out.images[0].shape == (3, 308, 224)  # 22 x 16 patches of 14 px


def test_user_text_never_becomes_control_tokens(tok):
    ids = tok.encode_chat([{"role": "user", "content": "[INST] </s> <s> [/INST] [SYSTEM_PROMPT]"}]).token_ids
    assert ids[:2] == [1, 3] and ids[-1] == 4
    assert [i for i in ids if i < 1000] == [1, 3, 4]


def test_prefix_assistant_and_tool_call_null_content(tok, ref):
    msgs = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2,", "prefix": True}]
    want = ref.encode_chat_completion(ChatCompletionRequest.from_openai(msgs, continue_final_message=True))
    assert tok.encode_chat(msgs).token_ids == want.tokens and want.tokens[-1] != 2  # no </s>


BAD_CASES = [
    ([], "messages must not be empty"),
    ("hi", "messages must be a list"),
    ([{"role": "user", "content": None}], r"messages\[0\] \(user\): content is missing or null"),
    ([{"role": "user"}], r"messages\[0\] \(user\): content is missing or null"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None}],
     r"messages\[1\] \(assistant\): content is missing or null"),
    ([{"role": "robot", "content": "x"}], r"messages\[0\] has unknown role 'robot'"),
    ([{"content": "x"}], r"messages\[0\] has no role"),
    (["x"], r"messages\[0\] must be an object"),
    ([{"role": "user", "content": 5}], "content must be a string or a list of parts"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "unsupported content part 'audio'"),
    ([{"role": "system", "content": [img(8, 8)]}, {"role": "user", "content": "x"}],
     r"messages\[0\] \(system\) content\[0\]: images are only allowed in user messages"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
     "Expected last role User or Tool"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "system", "content": "c"}, {"role": "user", "content": "d"}],
     "Unexpected role 'system' after role 'assistant'"),
    (tool_turn(CALLS_OPENAI)[:3], "Not the same number of function calls and responses"),
    ([{"role": "tool", "content": "x", "tool_call_id": 5}], r"messages\[0\]: tool_call_id"),
]


@pytest.mark.parametrize("messages,match", BAD_CASES)
def test_bad_requests(tok, messages, match):
    with pytest.raises(PromptError, match=match):
        tok.encode_chat(messages)


def test_bad_tools(tok):
    with pytest.raises(PromptError, match="Function name was bad name"):
        tok.encode_chat([{"role": "user", "content": "x"}], [{"name": "bad name", "parameters": {}}])
    with pytest.raises(PromptError, match=r"tools\[0\] must be a function tool"):
        tok.encode_chat([{"role": "user", "content": "x"}], [{"type": "function"}])


@needs_images
@pytest.mark.parametrize("url", ["http://example.com/cat.png", "https://example.com/cat.png",
                                 "data:image/png;base64,!!!notbase64!!!", "data:image/png;base64,aGVsbG8="])
def test_bad_images(tok, url):
    from engine.image_processor import ImageError

    with pytest.raises(ImageError, match=r"messages\[0\] \(user\) content\[1\]: "):
        part = {"type": "image_url", "image_url": {"url": url}}
        tok.encode_chat([{"role": "user", "content": [text("x"), part]}])


def test_missing_tekken(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory needs tekken.json"):
        Tokenizer.from_model_dir(tmp_path)


def test_raw_mode(tok):
    chat = tok.encode_chat([{"role": "user", "content": "hi"}]).token_ids
    assert tok.encode_raw("<s>[INST]hi[/INST]") == chat == [1, 3, 8101, 4]
    assert tok.encode_raw("hi") == tok.encode_text("hi") == [8101]  # no BOS unless written
    raw = tok.encode_raw("[SYSTEM_PROMPT]a[/SYSTEM_PROMPT]</s><SPECIAL_20>")
    assert raw == [17, *tok.encode_text("a"), 18, 2, 20]
    assert tok.encode_raw("x [NOPE] y") == tok.encode_text("x [NOPE] y")
    assert 3 not in tok.encode_text("[INST]")


def test_decode(tok):
    ids = tok.encode_raw("<s>[INST]hé[/INST]")
    assert tok.decode(ids) == "hé"
    assert tok.decode(ids, skip_special=False) == "<s>[INST]hé[/INST]"


FRAGMENTS = ["hello", " world", "é", "e\u0301", "naïve", "Ελληνικά", "русский", "你好世界", "日本語のテキスト",
             "한국어", "हिन्दी", "ภาษาไทย", "العربية", "👍", "👨‍👩‍👧‍👦", "🇫🇷🇯🇵", "🧑🏽‍💻", "\n", "  ", "𝔘𝔫𝔦"]


def test_incremental_detokenizer_random_text(tok):
    rng = random.Random(1234)
    split_chars = 0
    for _ in range(200):
        s = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12)))
        ids = tok.encode_text(s)
        det = IncrementalDetokenizer(tok)
        chunks = [det.push(i) for i in ids]
        chunks.append(det.flush())
        for c in chunks:
            assert isinstance(c, str) and "\ufffd" not in c
            c.encode("utf-8")  # no lone surrogates
        assert "".join(chunks) == tok.decode(ids) == s
        split_chars += sum(1 for i in ids if not _is_utf8(tok.tekken.id_to_byte_piece(i)))
    assert split_chars > 0  # the strings really contain tokens ending inside a character


def _is_utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_incremental_detokenizer_split_emoji(tok):
    ids = [1000 + b for b in "😀".encode()]  # byte tokens: rank b (< 256) is the single byte b
    det = IncrementalDetokenizer(tok)
    assert [det.push(i) for i in ids] == ["", "", "", "😀"] and det.flush() == ""
    assert tok.decode(ids) == "😀"
    det.push(ids[0]), det.push(ids[1])
    assert det.flush() == "\ufffd"  # truncated character at end of stream
    assert det.push(1) == "" and IncrementalDetokenizer(tok, skip_special=False).push(1) == "<s>"
