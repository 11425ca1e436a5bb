"""infinite-llm: an LLM serving engine with the KV cache and attention pooled across instances."""

from infinite_llm.engine.output import CompletionOutput, RequestOutput
from infinite_llm.entrypoints.api import LLM
from infinite_llm.sampling import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
