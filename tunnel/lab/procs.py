"""Helpers shared by the lab's daemons (mptun, OpenVPN, OpenConnect, wireguard-go):
stopping their processes and reading their logs for error messages."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterable, Optional


def stop_processes(procs: Iterable[Optional[subprocess.Popen]], timeout: float = 5.0) -> None:
    """SIGTERM each live process, SIGKILL it if it has not exited within ``timeout``."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def tail(path: Path, n: int = 15) -> str:
    return "\n".join(read_log(path).splitlines()[-n:]) or "(no log)"


def check_alive(proc: subprocess.Popen, log: Path, what: str) -> None:
    if proc.poll() is not None:
        raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail(log)}")
