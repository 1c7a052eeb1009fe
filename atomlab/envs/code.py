"""Placeholder: filled in by the environments work."""

from atomlab.envs.base import Environment

ENVIRONMENTS: list[type[Environment]] = []
