"""Our model vs transformers' Mistral3ForConditionalGeneration on the same random weights (fp32, CPU)."""

import pytest
import torch

from engine import SamplingParams
from engine.forward_context import ForwardContext
from util import hf_greedy, hf_pixels, image_chat

TOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


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


@pytest.mark.parametrize("kind", ["text", "images"])
def test_greedy_tokens_match_transformers(tiny_llm, hf_model, kind):
    chat = TEXT_CHATS[1] if kind == "text" else image_chat([(120, 90), (60, 200)])
    enc = tiny_llm.tokenizer.encode_chat(chat)
    ref = hf_greedy(hf_model, enc.token_ids, 32, enc.images)
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


def test_greedy_tokens_match_transformers_on_the_triton_backend(tiny_dir, hf_model):
    """The whole engine with the Triton attention and store kernels (Triton's interpreter on CPU): two
    chats batched, the longer one prefilled in chunks beside the other's decodes, give transformers'
    greedy tokens, as the reference backend does."""
    from engine import LLM
    llm = LLM(tiny_dir, device="cpu", dtype="float32", progress=False, kv_cache_memory=8 * 2**20,
              attention_backend="triton", max_num_batched_tokens=24)
    assert llm.engine.runner.attention.name == "triton"
    chats = [[{"role": "user", "content": "Hi"}], TEXT_CHATS[1]]
    outs = llm.generate(chats, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    for chat, out in zip(chats, outs):
        assert out.token_ids == hf_greedy(hf_model, llm.encode_chat(chat), 6)
