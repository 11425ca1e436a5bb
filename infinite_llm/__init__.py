"""infinite-llm: an LLM serving engine with the KV cache and attention pooled across instances."""

from infinite_llm.config import ConfigError
from infinite_llm.engine.engine import RequestError
from infinite_llm.entrypoints.api import LLM
from infinite_llm.models.loader import ModelNotFoundError
from infinite_llm.outputs import CompletionOutput, RequestOutput
from infinite_llm.sampling import SamplingParams, SamplingParamsError
from infinite_llm.version import __version__

__all__ = ["LLM", "CompletionOutput", "ConfigError", "ModelNotFoundError", "RequestError",
           "RequestOutput", "SamplingParams", "SamplingParamsError", "__version__"]
