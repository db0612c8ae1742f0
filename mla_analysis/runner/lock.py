"""Run-directory locks: one process at a time writes a run (or sweep) directory, on a shared filesystem too.

The lock is the file ``.mla_analysis.lock`` in the directory, created with O_CREAT | O_EXCL (atomic,
NFS included), holding the holder's host, pid, process start time and launch group. Stale locks:
one whose host is this host and whose process is gone (or whose pid now belongs to a process
started later) is taken over. A lock held from another host is never broken automatically, since
its process cannot be checked from here: the message names the file to delete once that run is
known to be gone. Under torchrun, rank 0 takes the lock and the other ranks check that it names
their own launch group (TORCHELASTIC_RUN_ID, MASTER_ADDR:MASTER_PORT) instead of fighting over it.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError

LOCK_FILE = ".mla_analysis.lock"
UNREADABLE_GRACE_S = 10.0  # a lock file without readable content older than this was left by a crash mid-write
RANK_WAIT_S = 60.0  # how long ranks > 0 wait for rank 0's lock


def process_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux /proc), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of stat; fields 1-2 end at the ')' of the name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def launch_group() -> Optional[str]:
    """An id shared by the ranks of one torchrun launch (None outside torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    env = os.environ
    return f"{env.get('TORCHELASTIC_RUN_ID', '')}@{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"


def _holder() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": process_start(pid), "group": launch_group(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv}


def describe(holder: dict[str, Any]) -> str:
    """'pid N on HOST since TIME' for messages."""
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"


class RunLock:
    """An exclusive lock on a directory, released on ``release()`` or at interpreter exit."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.path = self.dir / LOCK_FILE
        self.held = False

    def _read(self) -> Optional[dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def _stale(self, holder: Optional[dict[str, Any]]) -> bool:
        if holder is None:  # a crash between creating and writing the file, or garbage
            try:
                return time.time() - self.path.stat().st_mtime > UNREADABLE_GRACE_S
            except FileNotFoundError:
                return True
        if holder.get("host") != socket.gethostname():
            return False
        pid = holder.get("pid")
        if not isinstance(pid, int) or not _alive(pid):
            return True
        start = holder.get("start")
        return start is not None and process_start(pid) not in (None, start)

    def _prepare_dir(self) -> None:
        if self.dir.exists() and not self.dir.is_dir():
            raise ConfigError(f"{self.dir}: is an existing file (allowed: a directory, or a path that does not exist)")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{self.dir}: cannot be created ({e.strerror or type(e).__name__})") from None
        if not os.access(self.dir, os.W_OK | os.X_OK):
            raise ConfigError(f"{self.dir}: is not writable (allowed: a directory this user can write)")

    def acquire(self) -> "RunLock":
        """Take the lock or raise ConfigError naming the directory and the holder."""
        self._prepare_dir()
        me = _holder()
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = self._read()
                if self._stale(holder):
                    self._break(holder)
                    continue
                raise self._busy(holder) from None
            except OSError as e:
                raise ConfigError(f"{self.dir}: is not writable ({e.strerror or type(e).__name__})") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            atexit.register(self.release)
            return self
        raise self._busy(self._read())

    def clear_stale(self) -> None:
        """Remove the lock file when its holder is gone (a worker that died)."""
        if self.path.exists() and self._stale(self._read()):
            self._break(self._read(), quiet=True)

    def _break(self, holder: Optional[dict[str, Any]], quiet: bool = False) -> None:
        """Remove a stale lock: renamed first, so of two processes breaking it only one succeeds."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        what = describe(holder) if holder else "unreadable content"
        if not quiet:
            print(f"warning: {self.dir}: removed the stale lock of {what} (that process is gone)", file=sys.stderr)
        aside.unlink(missing_ok=True)

    def _busy(self, holder: Optional[dict[str, Any]]) -> ConfigError:
        who = describe(holder) if holder else "a process whose lock file is being written"
        hint = "wait for it to finish or use another directory"
        if holder and holder.get("host") != socket.gethostname():
            hint += f"; delete {self.path} if that run is gone (a lock from another host is never broken)"
        return ConfigError(f"{self.dir}: in use by another run ({who}): {hint}")

    def wait_for_group(self, group: str, timeout: float = RANK_WAIT_S) -> None:
        """Ranks > 0: wait until rank 0 holds the lock for ``group``; refuse when another launch holds it."""
        self._prepare_dir()
        deadline = time.time() + timeout
        while time.time() < deadline:
            holder = self._read()
            if holder is not None:
                if holder.get("group") == group:
                    return
                if not self._stale(holder):
                    raise self._busy(holder)
            time.sleep(0.1)
        # rank 0 never took it (it failed first): torchrun stops the ranks; nothing to fight over

    def release(self) -> None:
        """Remove the lock file when this process holds it (idempotent)."""
        if not self.held:
            return
        holder = self._read()
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self.held = False
