"""Atomic file and folder writes, and the sha256 checks of what they wrote.

An interrupted export, quantization or training run must leave the previous good
artifact intact: everything is written to a temporary sibling and renamed into place
(rename is atomic on POSIX within one filesystem).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    """The process umask, without changing it (Linux's /proc; elsewhere set-and-restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; the artifact gets the mode a plain open() would give it, so a
        # bundle copied to a robot or served from a container another user runs stays readable
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _owner(p: Path, stem: str) -> int | None:
    """The pid in `.{stem}.{pid}.*` (our temp / old / work folders), or None."""
    rest = p.name[len(stem) + 2:]
    head = rest.split(".", 1)[0].removeprefix("old-")
    return int(head) if head.isdigit() else None


def recover(final: Path) -> None:
    """Undo what a killed writer of `final` left behind: its temp and work folders beside
    `final` go, and if it died between moving the old artifact aside and renaming the new
    one in, the old one is put back (it is the last good artifact)."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    stem = final.name
    for p in sorted(final.parent.glob(f".{stem}.*")):
        pid = _owner(p, stem)
        if pid is None or pid == os.getpid() or _pid_alive(pid):
            continue
        if ".old-" in p.name and not final.exists():
            os.replace(p, final)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _sibling(final: Path, suffix: str) -> Path:
    """A new `.{name}.{pid}.*{suffix}` folder beside `final`, after clearing dead writers' ones."""
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=suffix, dir=final.parent))


def _umask_modes(folder: Path) -> None:
    """Give `folder` and everything in it the modes plain open()/mkdir() would: mkdtemp makes the
    folder 0700, and safetensors' save_file (transformers' save_pretrained too) writes 0600. Every
    checkpoint, bundle and training state is written inside an atomic_dir, so this one pass covers
    all their writers."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):  # never the target of a link out of the folder
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):  # an executable keeps its x bits (the umask still applies)
                os.chmod(path, (0o777 if st.st_mode & 0o111 else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces `final` in one rename.

    The old folder (if any) is moved aside first and deleted only after the new one
    is in place, so at every instant either the old or the new artifact is complete;
    a run killed at any point leaves folders that the next run for `final` cleans up
    (`recover`), restoring the old artifact if the kill fell between the two renames.
    """
    final = Path(final)
    tmp = _sibling(final, ".tmp")
    try:
        yield tmp
        _umask_modes(tmp)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def work_dir(final: Path) -> Iterator[Path]:
    """Scratch space for making `final` (a quantized copy on the way to a bundle): beside it, on
    the disk that will hold the result, removed at the end, and by the next run if killed."""
    work = _sibling(Path(final), ".work")
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_home() -> Path:
    """The user's edge-vila cache: compiled ops, fast graphs of read-only bundles, digests."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge-vila"


_RACY_NS = 2_000_000_000


def _stat_key(st: os.stat_result) -> list[int]:
    # ctime cannot be set from user space and moves with every write, rename-over or chmod, so a
    # file whose content changed by any ordinary means no longer matches its entry
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def checked_sha256(path: Path) -> str:
    """sha256 of `path`, hashed once per version of the file: the digest is remembered in the
    user's cache (`digests/`) with the file's device, inode, size, mtime and ctime, and reused
    while all five are unchanged. A 3B bundle plus its CPU fast graph is ~4 GB to hash, seconds
    at every start of a robot's program on an Orin; this keeps the check without the cost.
    `EDGE_VILA_VERIFY=full` hashes every time (what it catches beyond this: changes below the
    filesystem, e.g. a failing disk)."""
    if os.environ.get("EDGE_VILA_VERIFY", "") == "full":
        return sha256_file(path)
    path = Path(path).resolve()
    st = path.stat()
    memo = cache_home() / "digests" / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
    key = _stat_key(st)
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        rec = json.loads(memo.read_text())
        if rec["stat"] == key and isinstance(rec["sha256"], str):
            return rec["sha256"]
    digest = sha256_file(path)
    # remembered only when the file did not change while it was read, and its last change is
    # older than the filesystem's timestamp granularity can hide: a write in the same clock
    # tick as that change would leave all five numbers as they are ("racy git")
    if _stat_key(path.stat()) == key and time.time_ns() - st.st_ctime_ns > _RACY_NS:
        with contextlib.suppress(OSError):  # a read-only home only costs the next load a rehash
            atomic_write_json(memo, {"path": str(path), "stat": key, "sha256": digest})
            _prune(memo.parent)
    return digest


def _prune(folder: Path, keep: int = 1024) -> None:
    """Past `keep` entries, drop those whose file is gone (deleted bundles, test folders)."""
    entries = list(folder.glob("*.json"))
    if len(entries) <= keep:
        return
    for e in entries:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            if not Path(json.loads(e.read_text())["path"]).exists():
                e.unlink()


def read_json(path: Path, what: str = "file") -> dict:
    """Read a JSON object, turning OS/JSON failures into one-line EdgeVilaErrors."""
    from .errors import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing {what} (expected a JSON file)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise):
    after one multi-GB phase of a job, the next starts from what is really in use."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass
