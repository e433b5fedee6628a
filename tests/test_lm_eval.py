"""lm-eval's `local-completions` client with its remote tokenizer (vLLM's /tokenize, /detokenize,
/tokenizer_info) on a small multiple-choice task kept in the repo (tests/data/lm_eval): every choice's
loglikelihood, computed from /v1/completions' echoed prompt logprobs, equals transformers'
Mistral3ForConditionalGeneration log-softmax summed over the same token ids (fp32, the tiny checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from server_fixture import start_server, tiny_engine

from server.config import CLOUDFLARE_MODEL, ServerSettings

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "data" / "lm_eval"


@pytest.fixture(scope="module")
def live(tiny_dir):
    srv = start_server(tiny_engine(tiny_dir), ServerSettings())
    yield srv
    srv.stop()


def test_lm_eval_loglikelihoods_equal_transformers(live, hf_model, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(REPO)             # the task's data_files are relative to the repository root
    lm = LocalCompletionsAPI(base_url=f"{live.url}/v1/completions", model=CLOUDFLARE_MODEL,
                             tokenizer_backend="remote", tokenized_requests=True, batch_size=4, max_retries=1,
                             max_length=512)
    assert (lm.eot_token_id, lm.prefix_token_id) == (2, 1)       # </s> and <s>, parsed as control tokens
    out = simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(TASKS)),
                          log_samples=True)
    samples = out["samples"]["tiny_mc"]
    assert len(samples) == 5 and 0 <= out["results"]["tiny_mc"]["acc,none"] <= 1
    checked = 0
    for s in samples:
        for (context, continuation), [(ll, greedy)] in zip(s["arguments"], s["resps"]):
            ctx, cont = lm._encode_pair(context, continuation)
            assert ctx[0] != 1 and cont                          # token ids sent verbatim: no BOS added
            with torch.no_grad():
                logits = hf_model(input_ids=torch.tensor([ctx + cont])).logits[0].float()
            lps = torch.log_softmax(logits[len(ctx) - 1:-1], -1)
            target = torch.tensor(cont)
            ref = lps.gather(1, target[:, None]).sum().item()
            assert abs(ll - ref) < 1e-4, (context, continuation, ll, ref)
            assert greedy == bool((lps.argmax(-1) == target).all())
            checked += 1
    assert checked == sum(len(s["arguments"]) for s in samples) >= 15
