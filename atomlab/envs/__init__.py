"""Training environments: seeded tasks with strict verifiers, for RL, SFT data and evaluation."""

from atomlab.envs.base import MAX_RESPONSE_CHARS, Environment, Episode, Task, Verdict, extract_answer
from atomlab.envs.registry import list_environments, load_environment

__all__ = [
    "MAX_RESPONSE_CHARS",
    "Environment",
    "Episode",
    "Task",
    "Verdict",
    "extract_answer",
    "list_environments",
    "load_environment",
]
