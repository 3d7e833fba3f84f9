"""Run directories: preparing one, locking it to one writer, and writing its files atomically.

A run directory is written by one ``memzoo train`` at a time. :class:`RunLock` takes an
exclusive ``flock`` on ``run_dir/LOCK`` and writes the holder's pid and host into it; the kernel
drops the lock when the holder dies, so a lock left by a killed run is taken over by the next one
without a race. Where the file system has no ``flock`` the lock falls back to an exclusive
create, and a lock from a process that is gone (same host, pid not running) is taken over.

Every file a run rewrites (``config.yaml``, ``data.json``, reports) goes through
:func:`atomic_write_bytes`: a temp file in the same directory, fsync, rename, so a crash leaves
the old version or the new one, never a truncated mix.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

from pipelines.errors import InputError, UserError

log = logging.getLogger(__name__)

LOCK_NAME = "LOCK"


class RunDirError(InputError):
  """A run directory that cannot be created or written."""


class RunLockedError(UserError, RuntimeError):
  """Another live process holds the run directory's lock."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
  """Replaces ``path`` with ``data``: temp file beside it, fsync, rename, fsync the directory."""
  path = Path(path)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(directory: Path) -> None:
  # The rename itself is durable only once the directory entry is flushed.
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def prepare(run_dir: str | Path) -> Path:
  """Creates ``run_dir`` and checks it is a writable directory.

  Raises:
    RunDirError: one line naming the path and the reason (read-only, not a directory, ...).
  """
  path = Path(run_dir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    if not path.is_dir():
      raise NotADirectoryError(errno.ENOTDIR, "not a directory")
    probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test.", delete=True)
    probe.close()
  except (OSError, ValueError) as e:
    reason = getattr(e, "strerror", None) or str(e)
    raise RunDirError(f"run_dir {str(path)!r} cannot be used: {reason}") from None
  return path


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by someone else
  return True


class RunLock:
  """An exclusive lock on a run directory, held from :meth:`acquire` to :meth:`release`."""

  def __init__(self, run_dir: str | Path):
    self.path = Path(run_dir) / LOCK_NAME
    self._fd: int | None = None
    self._flock = True

  @property
  def held(self) -> bool:
    return self._fd is not None

  def _holder(self) -> dict:
    try:
      return json.loads(self.path.read_text() or "{}")
    except (OSError, ValueError):
      return {}

  def _refuse(self, holder: dict) -> RunLockedError:
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    return RunLockedError(
      f"run directory {str(self.path.parent)!r} is in use by pid {pid} on host {host} "
      f"(lock {self.path}); wait for it to finish or use another run_dir"
    )

  def _record(self) -> bytes:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    return (json.dumps(me) + "\n").encode()

  def acquire(self) -> RunLock:
    """Takes the lock or raises :class:`RunLockedError` naming the holder's pid and host."""
    for _ in range(10):
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        # The holder may not have written its record yet; give it a moment.
        time.sleep(0.05)
        raise self._refuse(self._holder()) from None
      except OSError as e:
        os.close(fd)
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
          self._flock = False
          return self._acquire_exclusive_create()
        raise
      # A releasing holder unlinks the file: if ours is no longer the one at the path, retry.
      try:
        same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if not same:
        os.close(fd)
        continue
      previous = self._holder()
      if previous.get("pid") not in (None, os.getpid()):
        log.warning(
          "taking over the lock of pid %s on host %s, which no longer holds it",
          previous.get("pid"),
          previous.get("host"),
        )
      os.ftruncate(fd, 0)
      os.pwrite(fd, self._record(), 0)
      os.fsync(fd)
      self._fd = fd
      return self
    raise RunLockedError(f"could not take {self.path}: it keeps being replaced")

  def _acquire_exclusive_create(self) -> RunLock:
    for _ in range(10):
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        holder = self._holder()
        if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder["pid"])):
          # Rename the stale file to a unique name first, so two takers never both remove it.
          stale = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
          try:
            os.rename(self.path, stale)
          except FileNotFoundError:
            continue
          if json.loads(stale.read_text() or "{}") != holder:
            os.rename(stale, self.path)  # someone else's fresh lock: put it back
            raise self._refuse(self._holder()) from None
          stale.unlink(missing_ok=True)
          log.warning("took over the lock of pid %s (no longer running)", holder.get("pid"))
          continue
        raise self._refuse(holder) from None
      os.write(fd, self._record())
      os.fsync(fd)
      self._fd = fd
      return self
    raise RunLockedError(f"could not take {self.path}: it keeps being replaced")

  def release(self) -> None:
    if self._fd is None:
      return
    # Unlink while still holding the lock, so a waiting taker never locks a removed file
    # (it checks the inode after locking).
    self.path.unlink(missing_ok=True)
    if self._flock:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> RunLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
