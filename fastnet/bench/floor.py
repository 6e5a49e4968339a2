"""The C floor of the pingpong case: ``_floor.c``, compiled with the
machine's C compiler, run as the server and client of the ``c`` row."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any


def build_floor(workdir: Any) -> Any:
    """Compile ``_floor.c`` into ``workdir``; return (path, None) or (None, why)."""
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_floor.c")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None, "no C compiler (cc) found"
    if not os.path.exists(src):
        return None, f"{src} is missing"
    exe = os.path.join(workdir, "fastnet_floor")
    try:
        proc = subprocess.run([cc, "-O2", "-o", exe, src], capture_output=True, text=True)
    except OSError as exc:
        return None, f"cannot run {cc}: {exc}"
    if proc.returncode != 0:
        return None, f"{cc} failed: {proc.stderr.strip()[-300:]}"
    return exe, None


def floor_commands(exe: Any, family: Any, path: Any, cfg: Any) -> Any:
    """(server_cmd, client_cmd(address)) of the compiled floor ``exe``."""
    server = [exe, "server", family] + ([path] if family == "unix" else [])

    def client(address: Any) -> Any:
        where = str(address[1]) if family == "tcp" else address
        return [exe, "client", family, where, str(cfg["size"]),
                str(cfg["warmup"]), str(cfg["sample"]), str(cfg["repeat"])]
    return server, client
