"""`atomlab ecosystem snapshot | report | serve-synthetic`."""

from __future__ import annotations

from typing import Any

from atomlab.ecosystem.report import add_report_command
from atomlab.ecosystem.snapshot import add_snapshot_command
from atomlab.ecosystem.synthetic import add_serve_command


def register(commands: Any) -> None:
    ecosystem = commands.add_parser("ecosystem", help="measure the open-model race: Hub snapshots and the report")
    sub = ecosystem.add_subparsers(dest="ecosystem_command", required=True)
    add_snapshot_command(sub)
    add_report_command(sub)
    add_serve_command(sub)
