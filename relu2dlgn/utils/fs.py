"""Atomic writes: the one place where files and directories are written under a temporary name and moved into
place, so that a crash, a full disk or an exception never leaves a half-written file at the target path.

* :func:`atomic_write_text` — one file: written to ``PATH.tmp-*`` beside it, fsynced, ``os.replace``d.
* :func:`atomic_dir` — one directory: the body writes into a fresh temporary directory beside ``PATH``; on
  success the old directory (if any) is renamed to ``PATH.old-*``, the new one renamed to ``PATH``, and the
  old one deleted. A process killed between the two renames leaves the complete previous directory at
  ``PATH.old-*`` (:func:`previous_version` finds it).
* :class:`StagedFiles` — several files (with their optional ``.data`` companions) written into a temporary
  directory beside the targets, then each moved into place with ``os.replace`` once the caller has checked
  them.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from typing import Callable, Iterator


def fsync_file(path: str) -> None:
    """Flush a written file's data to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` under a temporary name in the same directory, then ``os.replace`` it."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode())


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line and fsync (a crash leaves whole lines only, up to the last complete write)."""
    with open(path, "a") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, replace_if: Callable[[str], bool] | None = None) -> Iterator[str]:
    """Yield a temporary directory beside ``path``; on normal exit it becomes ``path`` atomically.

    ``replace_if(path)`` decides whether an existing ``path`` may be replaced (default: always); when it says
    no, :class:`FileExistsError` names it and nothing is written. On an exception the temporary directory is
    removed and ``path`` is untouched. Missing parent directories are created.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(path) and replace_if is not None and not replace_if(path):
        raise FileExistsError(f"'{path}' exists and is not something this write may replace")
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        for name in os.listdir(tmp):
            if os.path.isfile(os.path.join(tmp, name)):
                fsync_file(os.path.join(tmp, name))
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(src: str, dst: str) -> None:
    if os.path.exists(dst):
        old = dst + ".old-" + os.path.basename(src)
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)


def previous_version(path: str | os.PathLike, marker: str) -> str | None:
    """The newest ``PATH.old-*`` directory containing ``marker`` (left by an :func:`atomic_dir` replacement
    interrupted between its two renames), or ``None``."""
    path = os.fspath(path)
    found = sorted(glob.glob(glob.escape(path) + ".old-*"), key=os.path.getmtime)
    found = [p for p in found if os.path.exists(os.path.join(p, marker))]
    return found[-1] if found else None


class StagedFiles:
    """A temporary directory beside ``targets`` (files). Write each target's content to :meth:`path`, check it,
    then :meth:`commit` moves them into place with ``os.replace`` (a companion ``X.data`` file first, so the
    model never points at a missing file); :meth:`cleanup` removes whatever was not committed.

    Raises ``IsADirectoryError`` / ``FileNotFoundError`` / ``OSError`` before anything is written when a
    target is a directory or its directory is missing or unwritable.
    """

    def __init__(self, targets: list[str]):
        self.targets = [os.path.abspath(t) for t in targets]
        parent = os.path.dirname(self.targets[0])
        for t in self.targets:
            if os.path.isdir(t):
                raise IsADirectoryError(f"cannot write '{t}': it is a directory")
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"cannot write '{self.targets[0]}': directory '{parent}' does not exist")
        self.dir = tempfile.mkdtemp(prefix=f".{os.path.basename(self.targets[0])}.tmp-", dir=parent)

    def path(self, target: str) -> str:
        """Where ``target`` is staged."""
        return os.path.join(self.dir, os.path.basename(target))

    def extra(self, name: str) -> str:
        """A scratch file in the staging directory that is not committed."""
        return os.path.join(self.dir, name)

    def commit(self) -> None:
        for target in self.targets:
            staged = self.path(target)
            companions = [staged + ".data"] if os.path.exists(staged + ".data") else []
            for src in companions + [staged]:
                fsync_file(src)
                os.replace(src, os.path.join(os.path.dirname(target), os.path.basename(src)))

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "StagedFiles":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
