"""Prompt logprobs (vLLM's `prompt_logprobs`, and what an OpenAI completion with `echo` and `logprobs` shows):
the logprob and rank of every prompt token after the first, given the tokens before it, plus the top
alternatives.

Computed by the model from the step's hidden states, chunk by chunk as the prompt is prefilled: the logits of
prompt position q - 1 score token q. Only requests that ask for them get logits at every position of their
chunk, and those logits are taken ROWS positions at a time, so memory stays O(ROWS x vocab) whatever the
chunk. The values are written into `Request.prompt_logprobs` by position, so a chunk computed again after a
preemption writes the same values again.
"""

from __future__ import annotations

import torch

from engine.scheduler import SchedulerOutput

ROWS = 256      # positions whose [ROWS, vocab] float32 logits exist at once


class PromptLogprobs:
    """One step's pending prompt logprobs: computed on the device after the forward pass, stored on the
    host (`store`) after the step's read-back, so they add no wait of their own."""

    def __init__(self, model, sched: SchedulerOutput, hidden: torch.Tensor):
        self.pending = []       # (request, first position q, logprobs, ranks, top ids, top logprobs)
        offset = 0
        for s in sched.scheduled:
            req, start = s.request, s.request.num_computed_tokens
            if req.prompt_logprobs is not None:
                last = min(start + s.num_tokens, req.num_prompt_tokens - 1)     # positions q in [start+1, last]
                for q0 in range(start + 1, last + 1, ROWS):
                    q1 = min(q0 + ROWS, last + 1)
                    rows = hidden[offset + q0 - 1 - start:offset + q1 - 1 - start]
                    targets = torch.from_numpy(req.token_ids(q0, q1).copy()).to(hidden.device)
                    self.pending.append((req, q0, *_score(model, rows, targets, req.params.prompt_logprobs)))
            offset += s.num_tokens

    def store(self) -> None:
        for req, q0, lp, rank, top_ids, top_lp in self.pending:
            lp, rank = lp.tolist(), rank.tolist()
            top_ids, top_lp = top_ids.tolist(), top_lp.tolist()
            for i in range(len(lp)):
                req.prompt_logprobs[q0 + i] = (lp[i], rank[i], top_ids[i], top_lp[i])
        self.pending = []


def _score(model, rows: torch.Tensor, targets: torch.Tensor, k: int):
    """[m] logprobs and 1-based ranks of `targets`, and the [m, k] top alternatives, from hidden `rows`."""
    logprobs = torch.log_softmax(model.compute_logits(rows).float(), -1)
    chosen = logprobs.gather(1, targets[:, None])
    rank = (logprobs > chosen).sum(-1) + 1
    top = logprobs.topk(k, dim=-1)
    return chosen[:, 0], rank, top.indices, top.values
