"""What both daemons share: logging set-up, socket creation, policy loading and its SIGHUP
reloader, and equipping the shell from the config (control socket, metrics, keep_warm,
the privilege drop)."""

from __future__ import annotations

import json
import logging
import socket
import sys
from datetime import datetime, timezone

# imported with the daemons, not once they start: prometheus-client takes a while to load
from tunnel.app.metrics import MetricsServer

SOCKET_BUFFER = 4 * 1024 * 1024
LOG_FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, RFC 3339, ms), level, role, msg (+ exc with a traceback)."""

    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "role": self.role,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj)


def setup_logging(role: str, level: str, fmt: str = "text") -> logging.Logger:
    """Log to stderr at ``level``; ``fmt`` "text" (one readable line) or "json" (one JSON object a line)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(role))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s mptun-{role} %(levelname)s %(message)s"))
    log = logging.getLogger("mptun")
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
    return log


def udp_socket(family: int = socket.AF_INET) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    # *BUFFORCE (CAP_NET_ADMIN) lifts the net.core.[rw]mem_max cap; fall back to the capped option.
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):
        try:
            s.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
    return s


def load_policy_or_none(path):
    """The policy at ``path`` (None: no policy file). Raises PolicyError naming file, class and key."""
    if path is None:
        return None
    from tunnel.app.config import load_policy

    return load_policy(path)


def reloader(path, apply, log: logging.Logger):
    """A SIGHUP handler: load the policy again; a bad file keeps the old policy and says why."""

    def reload() -> None:
        if path is None:
            log.info("SIGHUP: no policy file configured; nothing to reload")
            return
        from tunnel.app.config import load_policy
        from tunnel.core.policy import PolicyError

        try:
            policy = load_policy(path)
        except PolicyError as exc:
            log.error("SIGHUP: policy not reloaded, keeping the old one: %s", exc)
            return
        apply(policy)
        log.info("SIGHUP: policy %s reloaded (%d classes)", path, len(policy.classes))

    return reload


def fmt_addr(addr) -> str:
    return f"{addr[0]}:{addr[1]}" if addr else "?"


def drop_target_and_key_check(cfg, log: logging.Logger):
    """The user to drop to after set-up (None: stay), checked before anything is set up,
    and a warning if the key file is readable by others (not by the daemon's own group)."""
    import os

    from tunnel.app import privs
    from tunnel.app.certs import key_mode_warning

    target = privs.resolve(cfg.user, cfg.group) if cfg.user else None
    if target is not None:
        privs.check(target)  # not root: say so before anything is set up
    own_groups = {os.getegid(), target.gid} if target is not None else {os.getegid()}
    if (warning := key_mode_warning(cfg.key, own_groups)) is not None:
        log.warning("%s", warning)
    return target


def equip_shell(shell, cfg, role: str, tun: str, target, keep, name: str = "") -> None:
    """What both daemons give their shell from the config: the control socket (its default
    path names the role and the TUN ``tun``), the warm-keeping pass, the metrics server
    (``name``: the client's, for its labels) and the privilege drop once it has started (to
    ``target``, keeping ``keep``: tunnel/app/privs.py)."""
    from tunnel.app import privs
    from tunnel.app.control import ControlServer, default_path

    shell.control = ControlServer(cfg.control or default_path(role, tun), shell.status)
    shell.keep_warm = cfg.keep_warm
    if cfg.metrics:
        shell.metrics = MetricsServer(*cfg.metrics, shell.status, role, name=name)
    shell.after_start = lambda: privs.after_setup(target, keep, logging.getLogger("mptun"))
