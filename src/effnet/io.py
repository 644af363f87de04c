"""File helpers every stage shares: atomic writes (a temp name, then a rename, so a killed stage leaves the old file
or the new one, never half of one) and sha256 hashing."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHUNK = 1 << 20


def write_atomic(path: str | Path, data: str | bytes, fs=None) -> None:
    """Write DATA to PATH through `PATH.tmp`; with FS (an fsspec filesystem), on that filesystem. A write that fails
    (a full disk) removes the temp file and leaves PATH as it was."""
    tmp = f"{path}.tmp"
    if fs is not None:
        try:
            with fs.open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
                f.write(data)
        except BaseException:
            if fs.exists(tmp):
                fs.rm(tmp)
            raise
        fs.mv(tmp, str(path))
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed write names no file: name the one meant
            e.filename = str(path)
        raise
    os.replace(tmp, path)


def write_json(path: str | Path, obj, fs=None) -> None:
    """OBJ as indented JSON with a final newline, written atomically."""
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n", fs)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A folder written whole or not at all: yields `PATH.tmp` (emptied first), which replaces PATH when the block
    succeeds; on an error it is removed and PATH is left as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A file written whole or not at all, by a writer that streams into it: yields `PATH.tmp`, which replaces
    PATH when the block succeeds; on an error it is removed and PATH is left as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


@contextmanager
def exclusive(path: str | Path, waiting=None) -> Iterator[int]:
    """Hold an exclusive lock on PATH (made if missing) while the block runs, waiting for whoever holds it (WAITING()
    is called first, once, when someone does); yields the lock's file descriptor. The kernel releases the lock when
    the last process holding the descriptor ends, however it ends (kill -9 included): a crash leaves nothing to
    clean up. Pass the descriptor to a child (`subprocess.Popen(pass_fds=...)`) to keep the lock until it ends too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                waiting()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def sha256_stream(f, h=None):
    """Feed the binary file object F into H (a new sha256 by default) in chunks; returns H."""
    h = h or hashlib.sha256()
    for chunk in iter(lambda: f.read(CHUNK), b""):
        h.update(chunk)
    return h


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f).hexdigest()


def sha256_tree(folder: str | Path) -> str:
    """One hash over a folder: every file's relative name and bytes, in sorted order."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + b"\0")
            with p.open("rb") as f:
                sha256_stream(f, h)
    return h.hexdigest()


def sha256_json(obj) -> str:
    """A hash of a JSON-able value that does not depend on key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
