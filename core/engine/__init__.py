"""Generation engine: scheduler, KV cache, sampler; it never knows which model family it runs."""

from core.engine.engine import Engine, GenerationResult
from core.engine.request import ContextOverflow, GenerationEvent, GenerationRequest

__all__ = ["ContextOverflow", "Engine", "GenerationEvent", "GenerationRequest", "GenerationResult"]
