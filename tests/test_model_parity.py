"""Our model vs transformers' Mistral3ForConditionalGeneration on the same random weights (fp32, CPU)."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from engine import SamplingParams
from engine.forward_context import ForwardContext

TOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def data_uri(w: int, h: int, seed: int) -> str:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_chat(sizes, text="Describe these."):
    parts = [{"type": "image_url", "image_url": {"url": data_uri(w, h, i)}} for i, (w, h) in enumerate(sizes)]
    return [{"role": "system", "content": "You see images."},
            {"role": "user", "content": [{"type": "text", "text": text}, *parts]}]


def hf_pixels(images: list[np.ndarray]):
    """HF takes one zero-padded batch plus each image's true size."""
    h = max(i.shape[1] for i in images)
    w = max(i.shape[2] for i in images)
    pv = torch.zeros(len(images), 3, h, w)
    for k, img in enumerate(images):
        pv[k, :, :img.shape[1], :img.shape[2]] = torch.from_numpy(img)
    return pv, torch.tensor([[i.shape[1], i.shape[2]] for i in images])


def our_logits(llm, ids: list[int], images=()):
    model = llm.model
    with torch.no_grad():
        emb = model.encode_images([torch.from_numpy(i) for i in images])
        emb = torch.cat(emb) if emb else None
        h = model(torch.tensor(ids), torch.arange(len(ids)), ForwardContext.for_prefill([len(ids)]), emb)
        return model.compute_logits(h)


TEXT_CHATS = [
    [{"role": "user", "content": "Hello, who are you?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to five."},
     {"role": "assistant", "content": "1 2 3 4 5"}, {"role": "user", "content": "Now backwards, en français."}],
]


@pytest.mark.parametrize("chat", TEXT_CHATS, ids=["single", "multi-turn"])
def test_text_logits_match_transformers(tiny_llm, hf_model, chat):
    ids = tiny_llm.encode_chat(chat)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor([ids])).logits[0]
    err = rel_err(our_logits(tiny_llm, ids), ref)
    assert err <= TOL, err


@pytest.mark.parametrize("sizes", [[(56, 84)], [(200, 300), (90, 40)], [(28, 28), (150, 70), (64, 200)]],
                         ids=["1-image", "2-images", "3-images"])
def test_image_logits_match_transformers(tiny_llm, hf_model, sizes):
    enc = tiny_llm.tokenizer.encode_chat(image_chat(sizes))
    assert len(enc.images) == len(sizes)
    assert enc.token_ids.count(10) == sum(i.shape[1] * i.shape[2] for i in enc.images) // 28 ** 2
    pv, image_sizes = hf_pixels(enc.images)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor([enc.token_ids]), pixel_values=pv, image_sizes=image_sizes).logits[0]
        text_only = hf_model(input_ids=torch.tensor([enc.token_ids])).logits[0]
    ours = our_logits(tiny_llm, enc.token_ids, enc.images)
    assert rel_err(ours, ref) <= TOL
    assert rel_err(text_only, ref) > 1e-2      # the images really changed the reference's logits


def hf_greedy(hf_model, ids, n, **images):
    out = hf_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            **images)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("kind", ["text", "images"])
def test_greedy_tokens_match_transformers(tiny_llm, hf_model, kind):
    chat = TEXT_CHATS[1] if kind == "text" else image_chat([(120, 90), (60, 200)])
    enc = tiny_llm.tokenizer.encode_chat(chat)
    extra = {}
    if enc.images:
        extra["pixel_values"], extra["image_sizes"] = hf_pixels(enc.images)
    ref = hf_greedy(hf_model, enc.token_ids, 32, **extra)
    out = tiny_llm.generate(chat, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
    assert out.prompt_token_ids == enc.token_ids
    assert out.token_ids == ref
    assert len(set(ref)) > 4             # not a degenerate constant sequence


def test_batched_generation_equals_alone(tiny_llm):
    """Prompts batched into one flat step (and decoded together over the paged cache) give the same tokens
    as each prompt alone."""
    prompts = ["Hi", "Write a long poem about the sea and the wind, please.", TEXT_CHATS[1]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    together = tiny_llm.generate(prompts, params)
    for p, out in zip(prompts, together):
        assert tiny_llm.generate(p, params)[0].token_ids == out.token_ids


def test_raw_prompt_is_verbatim(tiny_llm):
    chat = tiny_llm.encode_chat([{"role": "user", "content": "hi"}])
    raw = tiny_llm.generate("<s>[INST]hi[/INST]", SamplingParams(max_tokens=4, temperature=0), raw=True)[0]
    assert raw.prompt_token_ids == chat
    literal = tiny_llm.generate("<s>[INST]hi[/INST]", SamplingParams(max_tokens=1, temperature=0))[0]
    assert literal.prompt_token_ids.count(3) == 1     # chat mode: the typed [INST] stays text
