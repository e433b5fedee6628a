"""Numeric ranges of the sampling controls: what the engine accepts, and what each HTTP contract allows.

One table per contract, each entry written once. The engine's own range is the union of the contracts' (a
Workers temperature of 5 and an OpenAI frequency penalty of -2 are both valid SamplingParams); a contract
entry that equals the engine's refers to it instead of repeating its numbers. The defaults live on
SamplingParams; the protocol models, the OpenAPI spec and the command line all read these two places.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_SEED = 2**63 - 1     # fits an int64 tensor
MAX_LOGPROBS = 20        # OpenAI's top_logprobs ceiling
MAX_STOP = 16            # stop strings per request
MAX_N = 16               # choices per prompt (OpenAI's `n`): each is its own sequence sharing the prompt's blocks
MAX_PROMPTS = 64         # prompts in one /v1/completions request (a list of strings or of token-id lists)
LOGIT_BIAS = 100         # OpenAI's logit_bias values lie in [-100, 100]
MAX_LOGIT_BIAS = 300     # entries per request (OpenAI's bound): the sampler builds them into every step


@dataclass(frozen=True)
class Range:
    lo: float | None = None
    hi: float | None = None
    integer: bool = False

    def contains(self, v) -> bool:
        # written so that NaN fails
        return (self.lo is None or v >= self.lo) and (self.hi is None or v <= self.hi)

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"between {_num(self.lo)} and {_num(self.hi)}"
        return f">= {_num(self.lo)}" if self.lo is not None else f"<= {_num(self.hi)}"

    def span(self) -> str:
        """For help texts: '0-5', '>=1'."""
        if self.lo is not None and self.hi is not None:
            return f"{_num(self.lo)}-{_num(self.hi)}"
        return f">={_num(self.lo)}" if self.lo is not None else f"<={_num(self.hi)}"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


# What the engine itself accepts (engine.sampling_params.SamplingParams)
ENGINE = {
    "max_tokens": Range(0, None, True),     # 0: the prompt only (its logprobs), nothing generated
    "temperature": Range(0, None),
    "top_p": Range(0, None),
    "top_k": Range(-1, None, True),
    "seed": Range(0, MAX_SEED, True),
    "repetition_penalty": Range(0, None),
    "frequency_penalty": Range(-2, 2),
    "presence_penalty": Range(-2, 2),
    "logprobs": Range(0, MAX_LOGPROBS, True),
    "prompt_logprobs": Range(0, MAX_LOGPROBS, True),
    "logit_bias": Range(-LOGIT_BIAS, LOGIT_BIAS),
}

# The hosted Workers AI schema (contract.md §2.1)
WORKERS = {
    "max_tokens": Range(1, None, True),
    "temperature": Range(0, 5),
    "top_p": Range(0, 2),
    "top_k": Range(1, 50, True),
    "seed": Range(1, 9_999_999_999, True),
    "repetition_penalty": Range(0, 2),
    "frequency_penalty": Range(0, 2),
    "presence_penalty": Range(0, 2),
}

# OpenAI's documented ranges, plus vLLM's extensions (top_k, repetition_penalty, min_tokens). Counts without
# a documented ceiling get one that no real request reaches, so that absurd integers are refused by name.
BIG = 10**9
OPENAI = {
    "max_tokens": Range(1, BIG, True),
    "max_completion_tokens": Range(1, BIG, True),
    "temperature": Range(0, 2),
    "top_p": Range(0, 1),
    "top_k": Range(-1, BIG, True),
    "seed": Range(-(2**63), 2**63 - 1, True),
    "repetition_penalty": WORKERS["repetition_penalty"],
    "frequency_penalty": ENGINE["frequency_penalty"],
    "presence_penalty": ENGINE["presence_penalty"],
    "top_logprobs": ENGINE["logprobs"],
    "logprobs": Range(0, 5, True),          # /v1/completions: OpenAI's legacy limit
    "min_tokens": Range(0, None, True),     # and <= max_tokens, checked with it
    "n": Range(1, MAX_N, True),
    "prompt_logprobs": ENGINE["prompt_logprobs"],    # vLLM's: the prompt tokens' logprobs and alternatives
}
