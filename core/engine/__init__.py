"""Generation engine: scheduler, KV cache, sampler; it never knows which model family it runs."""

from core.engine.engine import Engine, GenerationResult
from core.engine.request import GenerationEvent, GenerationRequest

__all__ = ["Engine", "GenerationEvent", "GenerationRequest", "GenerationResult"]
