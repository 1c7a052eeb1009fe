"""Inference: the generation engine (batched, KV cache, sampling, streaming) and the terminal chat."""

from atomlab.infer.engine import Completion, Engine, Request, SamplingParams

__all__ = ["Completion", "Engine", "Request", "SamplingParams"]
