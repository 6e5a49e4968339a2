"""The entry point of every benchmark child: run one server or client role.

The children load this package by file path (see ``_load.py``), so the
anchor rows run even when the fastnet package does not import."""

from __future__ import annotations

import json
from typing import Any

from .cases import ROLES
from .common import NotAvailable


def _ready(address: Any) -> None:
    print("READY " + json.dumps(address), flush=True)


def main(arg: str, roles: dict[tuple[str, str], Any] | None = None) -> None:
    """Run the role that the JSON spec ``arg`` names (``roles``: the table to look it up in)."""
    spec = json.loads(arg)
    server, client = (ROLES if roles is None else roles)[(spec["case"], spec["impl"])]
    if spec["role"] == "server":
        try:
            server(spec, _ready)
        except NotAvailable as exc:
            print("NA " + str(exc), flush=True)
        return
    try:
        out = client(spec, spec["address"])
    except NotAvailable as exc:
        out = {"na": str(exc)}
    print(json.dumps(out), flush=True)
