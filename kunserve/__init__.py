"""kunserve: LLM serving that survives load bursts by dropping replicated weights."""

from kunserve.config import EngineConfig
from kunserve.llm import LLM
from kunserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from kunserve.runtime.engine import LLMEngine
from kunserve.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
]
__version__ = "0.1.0"
