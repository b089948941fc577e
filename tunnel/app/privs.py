"""Least privilege: after set-up, keep only the capabilities the role still uses
(:data:`CLIENT_KEEP`, :data:`SERVER_KEEP`), and, started as root with ``user``
set, become that unprivileged user first.

What each role does after set-up (the shell's ``after_start``), and so keeps:

- the server: nothing that needs privilege.  Its TUN, address, MTU and routes,
  its UDP sockets (bound, SO_RCVBUFFORCE) and its control and metrics sockets
  are all made before; afterwards it only reads and writes those descriptors,
  and SIGHUP re-reads files.  It keeps no capability at all (a listen port
  below 1024 is bound before the drop too).
- the client: CAP_NET_ADMIN, because it creates its TUN device on the first
  CONFIG (TUNSETIFF on the /dev/net/tun descriptor opened at start, see
  tunnel/io/tun.py), sets addresses, MTU and routes over rtnetlink on every
  CONFIG (also after a reconnect), writes
  /proc/sys/net/ipv6/conf/<tun>/disable_ipv6 and uses SO_RCVBUFFORCE on each
  new path socket; CAP_NET_RAW, because it opens a socket per path, bound to
  its interface with SO_BINDTODEVICE, whenever a path (re)connects or an
  interface is hot-plugged (kernels before 5.7 require it).

Two ways in: started as root with ``user`` set, :func:`drop` switches user and
reduces the bounding set too; started as an unprivileged user with capabilities
(systemd's AmbientCapabilities=, or ``user`` naming the user it already is),
:func:`narrow` keeps only the role's capabilities.  A daemon run as root
without ``user`` is left as it is.

Python has no capset(2).  This module calls it, and prctl(2), through ctypes on
the C library (glibc exports both): libcap's cap_set_proc would do the same
syscall behind another library that need not be installed, and the packages
that wrap it (python-prctl) need a compiler and libcap headers to install.

Capabilities are per thread: :func:`drop` and :func:`narrow` refuse to run when
the process has more than one thread (mptun runs everything on one event-loop
thread).  Nothing is exec'd afterwards, so the ambient set stays empty; the
bounding set is reduced to the kept capabilities (when CAP_SETPCAP allows it)
and no_new_privs is set, so even an exec of a set-uid binary could not gain
anything back.
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
from dataclasses import dataclass
from typing import Optional

CAP_NET_BIND_SERVICE, CAP_NET_ADMIN, CAP_NET_RAW = 10, 12, 13
CAP_SETPCAP = 8
# What each role keeps after set-up (why: the module docstring)
CLIENT_KEEP = (CAP_NET_ADMIN, CAP_NET_RAW)
SERVER_KEEP: tuple[int, ...] = ()
KEEP = CLIENT_KEEP
CAP_NAMES = {CAP_NET_BIND_SERVICE: "cap_net_bind_service", CAP_NET_ADMIN: "cap_net_admin", CAP_NET_RAW: "cap_net_raw"}

PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class PrivilegeError(Exception):
    """The privilege drop cannot be done (one line, says why)."""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]


def _prctl(option: int, arg: int = 0, what: str = "prctl") -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(f"{what} failed: {os.strerror(err)}")


def _capset(caps: tuple[int, ...]) -> None:
    """Permitted = effective = ``caps``, inheritable empty (this thread)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for cap in caps:
        word, bit = divmod(cap, 32)
        data[word].effective |= 1 << bit
        data[word].permitted |= 1 << bit
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise PrivilegeError(f"capset failed: {os.strerror(ctypes.get_errno())}")


def cap_mask(caps=KEEP) -> int:
    mask = 0
    for cap in caps:
        mask |= 1 << cap
    return mask


def proc_status(pid: int | str = "self") -> dict[str, str]:
    """/proc/PID/status as a dict (Uid, Gid, Groups, CapEff, CapPrm, ...)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


@dataclass(frozen=True)
class Target:
    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    def describe(self) -> str:
        return f"user {self.user} (uid {self.uid}, gid {self.gid})"


def resolve(user: str, group: Optional[str] = None) -> Target:
    """The uid, gid and supplementary groups of ``user`` (``group``: another primary group)."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"no such user {user!r}") from None
    gid = pw.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise PrivilegeError(f"no such group {group!r}") from None
    groups = tuple(sorted(set(os.getgrouplist(user, gid))))
    return Target(user, pw.pw_uid, gid, groups)


def check(target: Target) -> bool:
    """True if a drop is needed; PrivilegeError if it is needed but impossible (not root)."""
    if os.geteuid() == target.uid and os.getegid() == target.gid:
        return False  # already that user (e.g. started by systemd with User=)
    if os.geteuid() != 0:
        raise PrivilegeError(
            f"switching to {target.describe()} needs mptun to be started as root (it runs as uid {os.geteuid()})"
        )
    return True


# Imported lazily by mptun or the standard library after start-up: loaded before the drop, in
# case the unprivileged user cannot read the Python installation (e.g. one under /root).
WARM_UP = ("tunnel.core.policy", "tunnel.app.config", "tunnel.app.certs", "encodings.idna", "traceback", "linecache")


def _single_thread() -> None:
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        raise PrivilegeError(f"cannot drop privileges with {threads} threads (capabilities are per thread)")


def _caps_of(mask: int) -> tuple[int, ...]:
    return tuple(c for c in range(64) if mask >> c & 1)


def _names(caps: tuple[int, ...]) -> str:
    return ",".join(CAP_NAMES.get(c, str(c)) for c in caps) or "none"


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def _clear_ambient() -> None:
    try:
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "clearing the ambient set")
    except PrivilegeError:
        pass  # kernels before 4.3 have no ambient set


def drop(target: Target, keep: tuple[int, ...] = KEEP) -> str:
    """Become ``target`` keeping only ``keep`` (permitted and effective; those of them
    the process has); return a description.  Already ``target``: :func:`narrow`."""
    if not check(target):
        return narrow(keep) or f"already running as {target.describe()}; privileges unchanged"
    import importlib

    for name in WARM_UP:
        importlib.import_module(name)
    _single_thread()
    keep = _caps_of(cap_mask(keep) & int(proc_status().get("CapPrm", "0"), 16))
    for cap in range(_last_cap() + 1):  # bounding set: needs CAP_SETPCAP, so before setuid
        if cap not in keep:
            _prctl(PR_CAPBSET_DROP, cap, f"dropping capability {cap} from the bounding set")
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "setting no_new_privs")
    _prctl(PR_SET_KEEPCAPS, 1, "PR_SET_KEEPCAPS")
    try:
        os.setgroups(list(target.groups))
        os.setresgid(target.gid, target.gid, target.gid)
        os.setresuid(target.uid, target.uid, target.uid)
    except OSError as exc:
        raise PrivilegeError(f"cannot become {target.describe()}: {exc.strerror}") from None
    _capset(keep)
    _prctl(PR_SET_KEEPCAPS, 0, "PR_SET_KEEPCAPS")
    _clear_ambient()
    # verify: the kernel's view, and that root cannot be had back
    st = proc_status()
    eff = int(st.get("CapEff", "0"), 16)
    if eff != cap_mask(keep) or st.get("Uid", "").split() != [str(target.uid)] * 4:
        raise PrivilegeError(f"privilege drop did not take: Uid {st.get('Uid')}, CapEff {st.get('CapEff')}")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise PrivilegeError("privilege drop did not take: setuid(0) still works")
    return f"now {target.describe()}, capabilities {_names(keep)}"


def narrow(keep: tuple[int, ...]) -> Optional[str]:
    """Not root, with capabilities (e.g. systemd's AmbientCapabilities=): keep only those
    of ``keep`` the process has, in every set; None if there was nothing to drop (or
    any of the process's uids is 0: root is left as it is)."""
    st = proc_status()
    prm = int(st.get("CapPrm", "0"), 16)
    left = prm & cap_mask(keep)
    if "0" in st.get("Uid", "0").split() or prm == left and int(st.get("CapAmb", "0"), 16) == 0 and int(st.get("CapInh", "0"), 16) == 0:
        return None
    _single_thread()
    kept = _caps_of(left)
    if prm >> CAP_SETPCAP & 1:  # the bounding set can shrink only with CAP_SETPCAP
        for cap in range(_last_cap() + 1):
            if cap not in kept:
                _prctl(PR_CAPBSET_DROP, cap, f"dropping capability {cap} from the bounding set")
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "setting no_new_privs")
    _clear_ambient()
    _capset(kept)
    eff = int(proc_status().get("CapEff", "0"), 16)
    if eff != left:
        raise PrivilegeError(f"capability drop did not take: CapEff {eff:016x}")
    return f"still uid {os.geteuid()}, capabilities {_names(kept)}"


def after_setup(target: Optional[Target], keep: tuple[int, ...], log) -> None:
    """The shell's ``after_start``: drop what the role no longer needs, and say so."""
    if target is not None and check(target):
        log.info("privileges dropped: %s", drop(target, keep))
    elif os.geteuid() != 0 and (what := narrow(keep)) is not None:
        log.info("privileges dropped: %s", what)
