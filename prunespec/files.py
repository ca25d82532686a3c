"""Writing files whole or not at all.

Every file prunespec writes goes through :func:`atomic_write`: the bytes go to a temporary file in the
target's folder, are flushed and fsynced, and the temporary file is then renamed over the target
(``os.replace``, atomic on POSIX and Windows), after which the folder is fsynced where the platform allows
it. A reader, or a process killed at any moment, sees either the old file or the new one, never half of
one. A killed process can leave its temporary file behind: it is named ``.<name>.tmp-<random>`` next to
the target, and may be deleted.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import OutputError

TEMP_MARK = ".tmp-"


def temp_name(target: Path) -> Path:
    """A fresh temporary name next to ``target``: ``.<name>.tmp-<random>``."""
    return target.with_name(f".{target.name}{TEMP_MARK}{secrets.token_hex(6)}")


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Raise OutputError unless ``path`` can be written: its folder exists and is writable, and it is
    not a folder itself. Returns it as a Path. Meant to run before long work whose result goes there."""
    target = _resolve(Path(path))
    parent = target.parent
    if target.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name, e.g. {Path(path) / 'model.pt'}")
    if not parent.is_dir():
        raise OutputError(f"{path}: the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: the folder {parent} is not writable; choose a path in a writable folder")
    if target.exists() and not os.access(target, os.W_OK):
        raise OutputError(f"{path}: the file exists and is read-only; choose another path or make it writable")
    return target


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(file)``, atomically: if anything fails or the process dies, the
    old file (if any) is left as it was.

    A failure to write (a missing folder, no permission, a full disk: any OSError) is an OutputError;
    any other exception raised by ``write`` propagates unchanged. Either way the temporary file is removed.
    """
    target = check_writable(path)
    mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else None
    temp, fd = _create_temp(target, path)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        if mode is not None:  # a rewritten file keeps its permissions
            os.chmod(temp, mode)
        os.replace(temp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise OutputError(f"{path}: could not write the file: {exc} (an existing file was left as it was)") from exc
        raise
    _fsync_folder(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """:func:`atomic_write` of ``data``."""

    def write(file: BinaryIO) -> None:
        file.write(data)

    atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """:func:`atomic_write` of ``text``, encoded."""
    atomic_write_bytes(path, text.encode(encoding))


def _resolve(path: Path) -> Path:
    """The file a write to ``path`` lands in: through a symlink, as a plain ``open`` would."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _create_temp(target: Path, path: str | os.PathLike[str]) -> tuple[Path, int]:
    # O_EXCL: never reuse someone else's file; mode 0o666 minus the umask, as a plain open() would give
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(16):
        temp = temp_name(target)
        try:
            return temp, os.open(temp, flags, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"{path}: could not create a file in {target.parent}: {exc}") from exc
    raise OutputError(f"{path}: could not find a free temporary name in {target.parent}")


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; folders cannot be opened (or fsynced) everywhere, e.g. Windows."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
