"""Atomic file writes: every file foodvision writes goes to a temporary name beside it (same filesystem,
unique per process and call), is flushed to disk, then renamed over the final name. A failed or killed
write leaves the previous file, or nothing: never a truncated file under the final name."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from foodvision.errors import ToolError

log = logging.getLogger(__name__)

# errno values that only a write can raise: always a disk problem, wherever the OSError comes from.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
# ... and those that a read can raise too: a disk problem when they concern a folder being written.
FOLDER_ERRNOS = (errno.ENOENT, errno.EACCES, errno.EPERM)


class DiskWriteError(ToolError):
    """A file could not be written: disk full, read-only or missing folder, no permission."""


def temporary_name(path: str | os.PathLike[str]) -> Path:
    """``.<name>.<pid>.<random>.tmp`` beside ``path``: two processes (or two calls) never share one."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def describe_os_error(error: OSError, path: str | bytes | os.PathLike[str]) -> str:
    """One line saying what went wrong writing ``path``, and what to do."""
    path = os.fsdecode(path) if isinstance(path, bytes) else path
    reasons = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the filesystem is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOENT: "its folder does not exist (deleted while running?)",
    }
    reason = reasons.get(error.errno, error.strerror or str(error))
    return f"cannot write {path}: {reason}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on any error it is removed and an
    ``OSError`` becomes a :class:`DiskWriteError` naming ``path``."""
    path = Path(path)
    temporary = temporary_name(path)
    try:
        yield temporary
        with contextlib.suppress(OSError):  # flush to disk where the platform allows
            fd = os.open(temporary, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(temporary, path)
    except BaseException as error:
        # The OSError of a failed write, also where a C++ writer re-raised it as a RuntimeError (torch's zip
        # writer: "unexpected pos"; torch.jit.save: "file write failed").
        cause = _write_error(error, temporary, path) if isinstance(error, (OSError, RuntimeError)) else None
        full = cause is None and isinstance(error, RuntimeError) and disk_nearly_full(path.parent)
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        if full:
            cause = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        if cause is None:
            raise
        raise DiskWriteError(describe_os_error(cause, path)) from error


def _write_error(error: BaseException, temporary: Path, path: Path) -> OSError | None:
    """The first ``OSError`` about writing ``path`` in ``error``'s chain (itself, cause, context)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            return current if _concerns(current, temporary, path) else None
        current = current.__cause__ or current.__context__
    return None


def _concerns(error: OSError, temporary: Path, path: Path) -> bool:
    """Whether ``error`` is about writing ``path``: it names no file (a failed ``write``), or names the
    temporary file, ``path`` or its folder."""
    names = [name for name in (error.filename, error.filename2) if name is not None]
    if not names:
        return True
    ours = {p.absolute() for p in (temporary, path, path.parent)}
    for name in names:
        try:
            if Path(os.fsdecode(name)).absolute() in ours:
                return True
        except (TypeError, ValueError):
            return True
    return False


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """``open(path, mode)`` that writes atomically (see module docstring)."""
    with atomic_path(path) as temporary, open(temporary, mode, **kwargs) as handle:
        yield handle


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def write_json(path: str | os.PathLike[str], value: Any, indent: int | None = 2) -> None:
    """Strict JSON (no NaN/Infinity tokens: non-finite floats are written as null)."""
    write_text(path, json.dumps(finite_json(value), indent=indent, allow_nan=False))


def write_with(path: str | os.PathLike[str], writer: Callable[[Path], Any]) -> None:
    """Let ``writer(temporary_path)`` write the file (torch.save, onnx.save, ...), then rename it."""
    with atomic_path(path) as temporary:
        writer(temporary)


def finite_json(value: Any) -> Any:
    """``value`` with NaN and infinite floats replaced by None, so that it is valid strict JSON."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def ensure_dir(folder: str | os.PathLike[str]) -> Path:
    """``folder``, created with its parents if needed; a failure is a :class:`DiskWriteError` naming it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DiskWriteError(describe_os_error(error, folder)) from error
    return folder


def save_torch(path: str | os.PathLike[str], value: Any) -> None:
    """``torch.save(value, path)``, atomically. Saved through a Python file handle, so that a full disk
    raises ``OSError(ENOSPC)`` (torch's own file writer raises a bare ``RuntimeError``)."""
    import torch

    with atomic_open(path, "wb") as handle:
        torch.save(value, handle)


def disk_nearly_full(folder: str | os.PathLike[str], margin: int = 1 << 20) -> bool:
    """Whether the filesystem holding ``folder`` has less than ``margin`` bytes left for this user."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < margin


def disk_error(
    error: BaseException, folders: tuple[str | os.PathLike[str], ...] = ()
) -> DiskWriteError | None:
    """The :class:`DiskWriteError` behind ``error`` (itself, or in its ``__cause__``/``__context__`` chain:
    Lightning, loggers and C++ writers re-raise or wrap), else None.

    A raw ``OSError`` counts when only a write can raise it (disk full, quota, read-only filesystem), or
    when it is a missing folder or a permission error on a path inside one of ``folders`` (the run dir:
    deleted or made read-only while running)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DiskWriteError):
            return current
        if isinstance(current, OSError) and _is_disk_error(current, folders):
            named = os.fsdecode(current.filename) if isinstance(current.filename, (str, bytes)) else None
            where = named or (f"into {folders[0]}" if folders else "a file")  # a failed write() names none
            return DiskWriteError(describe_os_error(current, where))
        current = current.__cause__ or current.__context__
    return None


def _is_disk_error(error: OSError, folders: tuple[str | os.PathLike[str], ...]) -> bool:
    if error.errno in WRITE_ERRNOS:
        return True
    if error.errno not in FOLDER_ERRNOS or not error.filename:
        return False
    try:
        target = Path(os.fsdecode(error.filename)).absolute()
    except (TypeError, ValueError):
        return False
    if error.errno == errno.ENOENT and target.parent.is_dir():  # a missing file to read, not a lost folder
        return False
    return any(target.is_relative_to(Path(folder).absolute()) for folder in folders)


_fallbacks: dict[str, Path] = {}


def writable_cache_dir(preferred: str | os.PathLike[str], what: str = "cache") -> Path:
    """``preferred``, created if needed, when files can be written there; otherwise a private folder under
    the system temporary directory (``foodvision-cache-<uid>/<name>-<digest>``, kept between runs of this
    user) with one warning line. A read-only or foreign cache folder slows a run down; it never stops it.
    Raises :class:`DiskWriteError` only when no folder at all can be written."""
    preferred = Path(preferred).expanduser()
    key = str(preferred.absolute())
    if key in _fallbacks:
        return _fallbacks[key]
    problem = write_problem(preferred)
    if problem is None:
        return preferred
    fallback = fallback_cache_dir(preferred)
    try:
        fallback.parent.mkdir(mode=0o700, exist_ok=True)
        if hasattr(os, "getuid") and fallback.parent.stat().st_uid != os.getuid():  # another user's
            fallback = Path(tempfile.mkdtemp(prefix=f"foodvision-{preferred.name or 'cache'}-"))
    except OSError:
        fallback = Path(tempfile.mkdtemp(prefix=f"foodvision-{preferred.name or 'cache'}-"))
    fallback_problem = write_problem(fallback)
    if fallback_problem is not None:
        raise DiskWriteError(f"{problem}; the temporary fallback {fallback} is not writable either")
    log.warning("%s; the %s uses %s instead for this run", problem, what, fallback)
    _fallbacks[key] = fallback
    return fallback


def fallback_cache_dir(preferred: str | os.PathLike[str]) -> Path:
    """Where :func:`writable_cache_dir` puts the cache of an unwritable ``preferred`` folder (the same
    folder for every run of this user, so that the fallback cache is reused; read it as a second place)."""
    preferred = Path(preferred).expanduser()
    digest = hashlib.sha256(str(preferred.absolute()).encode()).hexdigest()[:10]
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"foodvision-cache-{user}" / f"{preferred.name or 'cache'}-{digest}"


def write_problem(folder: str | os.PathLike[str], keep: bool = True) -> str | None:
    """None when a file can be written in ``folder`` (created if missing; removed again unless ``keep``),
    else why not (one line). The probe holds 4 KiB: an empty file takes no block, so it would not notice
    a full disk."""
    folder = Path(folder)
    created = not folder.is_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = temporary_name(folder / "probe")
        try:
            probe.write_bytes(b"\0" * 4096)
        finally:
            probe.unlink(missing_ok=True)
    except OSError as error:
        return describe_os_error(error, folder).replace("cannot write", "cannot write into", 1)
    finally:
        if created and not keep:
            with contextlib.suppress(OSError):
                folder.rmdir()
    return None


def quiet_thread_disk_errors(
    folders: Callable[[], tuple[str | os.PathLike[str], ...]],
) -> list[DiskWriteError]:
    """Keep a background writer thread (TensorBoard's event writer) that dies of a disk error from printing
    a traceback: the error is appended to the returned list instead (the main thread meets the same error
    at its next write, and reports it in one line). Other thread errors print as usual."""
    caught: list[DiskWriteError] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        disk = disk_error(args.exc_value, folders()) if args.exc_value is not None else None
        if disk is None:
            previous(args)
        else:
            caught.append(disk)

    threading.excepthook = hook
    return caught
