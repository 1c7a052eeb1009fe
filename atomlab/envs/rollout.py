"""Placeholder: rollouts of environments against chat endpoints (filled in by the environments work)."""

from __future__ import annotations

import argparse


def register(envs_commands: argparse._SubParsersAction) -> None:
    """Add `atomlab envs rollout` to the `envs` subcommands."""
