"""One run per workdir at a time: an OS-level lock on `WORKDIR/.tracefl.lock`.

`flock` is released by the kernel when its holder exits for any reason (SIGKILL included),
so a lock file left by a dead process never blocks: the file is only a place to lock and to
name the holder. A second run is refused at once (no waiting) with one line naming the holder
(pid, host, start time). The file is removed, still locked, when the run ends; a run that
locked a file another run had just removed (the path no longer names its inode) takes the
lock again on the new file.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from tracefl_jax.experiment.io import WorkdirError

LOCK_FILE = ".tracefl.lock"


class WorkdirBusyError(WorkdirError):
  """Another live run holds the workdir's lock."""


class WorkdirLock:
  """`with WorkdirLock(workdir): ...` holds the workdir for the block (or `acquire`/`release`).

  Raises:
    WorkdirBusyError: one line naming the workdir and the holder, when another run holds it.
  """

  def __init__(self, workdir: str | Path):
    self.path = Path(workdir) / LOCK_FILE
    self._fd: int | None = None

  def acquire(self) -> "WorkdirLock":
    while True:
      fd = self._open()
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise WorkdirBusyError(
            f"workdir {self.path.parent} is in use by another run ({holder}); wait for it to "
            f"end, or use another --workdir") from None
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)  # the file was removed by the run that just ended: lock the new one
    os.ftruncate(fd, 0)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {stamp}\n".encode())
    self._fd = fd
    return self

  def _open(self) -> int:
    """The lock file, opened or created; never through a symbolic link (a dangling one made
    `open` fail with a bare 'No such file or directory')."""
    try:
      return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
      if self.path.is_symlink():
        raise WorkdirError(
            f"{self.path} is a symbolic link (to {os.readlink(self.path)}), not the lock file "
            f"a run leaves: remove it (rm {self.path}) and run again") from None
      raise WorkdirError(f"cannot open the workdir's lock file {self.path} ({e.strerror}): "
                         f"it must be a regular file the run can write; remove it or fix its "
                         f"permissions, and run again") from None

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      self.path.unlink(missing_ok=True)  # still locked: no run can take the old file meanwhile
    except OSError:
      pass
    os.close(self._fd)  # closing releases the lock
    self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
