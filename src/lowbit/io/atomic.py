"""Atomic file writes: a temporary file in the target's directory, fsync, rename.

The temporary for target ``dir/name`` is ``dir/.name.<pid>.<8 hex digits>.tmp``, ``pid`` being
the writing process. A write that fails or is interrupted by an exception removes its
temporary and leaves the old file (or none) in place; a reader never sees a half-written
file. A writer killed outright (``kill -9``, OOM killer, power loss) cannot clean up, so every
write first removes the temporaries of the same target whose writer process no longer exists;
those of live writers (a concurrent save of the same file) are left alone. A reused pid only
delays that cleanup. POSIX only: elsewhere stale temporaries are left in place.

The file gets the mode a plain ``open(path, "w")`` would give it, ``0o666 & ~umask`` (not the
0o600 of ``mkstemp`` or of safetensors' ``save_file``).
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path
from typing import Callable

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: some filesystems refuse)."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - filesystem-dependent
        pass


def temporary_name(target: Path, pid: int, token: str) -> str:
    """The name of a temporary file for ``target`` written by process ``pid``."""
    return f".{target.name}.{pid}.{token}.tmp"


def _temporary_pattern(target: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(target.name)}\.([0-9]{{1,10}})\.[0-9a-f]{{8}}\.tmp")


def process_exists(pid: int) -> bool:
    """Whether a process ``pid`` exists (conservatively True where that cannot be told)."""
    if os.name != "posix" or pid <= 0:  # Windows' os.kill(pid, 0) would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):  # another user's process, or an odd pid
        return True
    return True


def stale_temporaries(target: Path) -> list[Path]:
    """Temporaries of ``target`` (in its directory) whose writer process is gone."""
    target = Path(target)
    pattern = _temporary_pattern(target)
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return []
    stale = []
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is not None and not process_exists(int(m.group(1))):
            stale.append(Path(entry.path))
    return stale


def remove_stale_temporaries(target: Path) -> None:
    for tmp in stale_temporaries(target):
        try:
            tmp.unlink()
        except FileNotFoundError:  # another writer cleaned it first
            pass


def _create_temporary(target: Path) -> Path:
    """Create an empty temporary next to ``target`` with mode ``0o666 & ~umask``."""
    while True:
        tmp = target.parent / temporary_name(target, os.getpid(), secrets.token_hex(4))
        try:
            os.close(os.open(tmp, _CREATE_FLAGS, 0o666))  # the kernel applies the umask
            return tmp
        except FileExistsError:  # pragma: no cover - a 1-in-4-billion clash: draw again
            continue


def _restore_mode(tmp: Path, mode: int) -> None:
    """Writers that create the file their own way (safetensors' ``save_file`` leaves 0o600)
    get the mode a new file gets here."""
    if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
        os.chmod(tmp, mode)


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file next to ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _create_temporary(path)
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # what the umask (and any default ACL) gives a new file
        write(tmp)
        _restore_mode(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    fsync_directory(path.parent)
    return path
