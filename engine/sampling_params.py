"""Per-request sampling controls. Validated once at construction; every route maps its own schema onto it."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from engine.limits import ENGINE, MAX_LOGIT_BIAS, MAX_STOP


@dataclass(frozen=True)
class SamplingParams:
    """The union of what the hosted Workers AI schema and the OpenAI API accept; each HTTP route checks its own
    narrower ranges before building one. Edge values and what they mean:

    - max_tokens >= 0 (hosted default 256). 0 generates nothing: the prompt is only scored (prompt_logprobs).
    - temperature >= 0 (hosted default 0.15). 0 = greedy. Values above 2 are valid (the hosted schema allows up
      to 5): temperature 5 flattens the distribution towards uniform, and the math stays finite (no NaN).
    - top_p >= 0. Values >= 1 turn nucleus sampling off (the hosted schema allows up to 2). 0 keeps only the most
      likely token, i.e. greedy, never an empty distribution.
    - top_k: 0 or -1 = off; k >= 1 keeps the k most likely tokens (1 = greedy).
    - seed: None (the engine draws one) or 0..2**63-1 (hosted: 1..9999999999). Same seed + params + prompt
      give the same tokens, whatever else is in the batch.
    - repetition_penalty >= 0 (vLLM/HF semantics over prompt + generated tokens: positive logits are divided by
      it, negative ones multiplied). 1 = off, and 0 = off too: the hosted schema allows 0, and dividing by zero
      has no meaning.
    - frequency_penalty, presence_penalty in [-2, 2] (OpenAI semantics over generated tokens only:
      logit -= frequency_penalty * count + presence_penalty * (count > 0)). 0 = off.
    - stop: a string or a sequence of up to 16 non-empty strings, kept as a tuple. stop_token_ids: token ids.
    - min_tokens in [0, max_tokens]: EOS and stop_token_ids cannot be sampled before that many tokens
      (as in vLLM, ignore_eos changes only whether EOS stops the request, not this ban).
    - logprobs: None = off; 0 = the chosen token's logprob only; 1..20 = plus that many top alternatives.
    - prompt_logprobs: None = off; k in 0..20 = each prompt token's logprob (the first has none) and its rank,
      plus the k most likely alternatives (vLLM's). Computed by the model, never taken from the prefix cache.
    - logit_bias: {token id: bias in [-100, 100]} added to those logits before sampling (OpenAI's); logprobs
      still report the model's own distribution. Kept as a sorted tuple of (id, bias) pairs.
    - grammar: an llguidance grammar (engine.guided.GrammarCompiler builds them from JSON schemas and tool
      definitions); every sampled token is constrained to it. None = free text.
    """

    max_tokens: int = 256            # the hosted model's default
    temperature: float = 0.15        # the model card's recommendation and the hosted default; 0 = greedy
    top_p: float = 1.0               # >= 1 disables nucleus sampling
    top_k: int = 0                   # 0 (or -1) disables top-k
    seed: int | None = None
    ignore_eos: bool = False
    # fields added after the first six keep the original positional order intact
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    logprobs: int | None = None
    grammar: str | None = None
    prompt_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self):
        def bad(field: str, why: str):
            raise ValueError(f"{field}: {why}")

        def number(field: str):
            rng = ENGINE[field]
            lo, hi = rng.lo, math.inf if rng.hi is None else rng.hi
            v = getattr(self, field)
            # bool is an int subclass: True as a temperature is a client bug, not 1.0
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                bad(field, f"must be a number, got {v!r}")
            if not math.isfinite(v):
                bad(field, f"must be finite, got {v!r}")
            if v < lo:
                bad(field, f"must be >= {lo:g}, got {v!r}")
            if v > hi:
                bad(field, f"must be <= {hi:g}, got {v!r}")
            object.__setattr__(self, field, float(v))

        def integer(field: str, v, lo: int, hi: int | None = None) -> int:
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                bad(field, f"must be an integer, got {v!r}")
            if v < lo:
                bad(field, f"must be >= {lo}, got {v!r}")
            if hi is not None and v > hi:
                bad(field, f"must be <= {hi}, got {v!r}")
            return int(v)

        def set_int(field: str, lo: int | None = None, hi: int | None = None):
            rng = ENGINE.get(field)
            lo = rng.lo if lo is None else lo
            hi = rng.hi if hi is None and rng is not None else hi
            object.__setattr__(self, field, integer(field, getattr(self, field), lo, hi))

        set_int("max_tokens")
        number("temperature")
        number("top_p")
        set_int("top_k")
        if self.seed is not None:
            set_int("seed")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", f"must be a boolean, got {self.ignore_eos!r}")
        number("repetition_penalty")
        number("frequency_penalty")
        number("presence_penalty")

        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)):
            bad("stop", f"must be a string or a list of strings, got {type(stop).__name__}")
        if len(stop) > MAX_STOP:
            bad("stop", f"at most {MAX_STOP} strings, got {len(stop)}")
        for s in stop:
            if not isinstance(s, str) or not s:
                bad("stop", f"each entry must be a non-empty string, got {s!r}")
        object.__setattr__(self, "stop", tuple(stop))

        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)):
            bad("stop_token_ids", f"must be a list of integers, got {type(ids).__name__}")
        object.__setattr__(self, "stop_token_ids", tuple(integer("stop_token_ids", t, 0) for t in ids))

        set_int("min_tokens", 0, self.max_tokens)
        if self.logprobs is not None:
            set_int("logprobs")
        if self.prompt_logprobs is not None:
            set_int("prompt_logprobs")
        object.__setattr__(self, "logit_bias", self._logit_bias(bad))
        if self.grammar is not None and not isinstance(self.grammar, str):
            bad("grammar", f"must be a compiled grammar string, got {type(self.grammar).__name__}")

    def _logit_bias(self, bad) -> tuple[tuple[int, float], ...]:
        bias = self.logit_bias
        pairs = bias.items() if isinstance(bias, dict) else bias
        if not isinstance(pairs, (tuple, list, type({}.items()))):
            bad("logit_bias", f"must be a mapping of token ids to numbers, got {type(bias).__name__}")
        rng, out = ENGINE["logit_bias"], {}
        if len(pairs) > MAX_LOGIT_BIAS:
            bad("logit_bias", f"at most {MAX_LOGIT_BIAS} entries are accepted, got {len(pairs)}")
        for pair in pairs:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                bad("logit_bias", f"expected (token id, bias) pairs, got {pair!r}")
            token, value = pair
            if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
                bad("logit_bias", f"keys must be token ids (integers >= 0), got {token!r}")
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not rng.contains(value):
                bad("logit_bias", f"the bias of token {token} must be a number {rng.describe()}, got {value!r}")
            out[int(token)] = float(value)
        return tuple(sorted(out.items()))

    @property
    def greedy(self) -> bool:
        # top_p 0 keeps only the most likely token: the same as greedy, never an empty distribution
        return self.temperature == 0 or self.top_k == 1 or self.top_p == 0
