"""Local inference engine for Mistral Small 3.1 24B Instruct (2503), text and vision."""

from engine.llm import LLM, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
