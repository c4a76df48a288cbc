"""Writing results so that nothing is lost: atomic files, staged output folders, resumable run folders, PNG bytes.

- ``write_bytes_atomic`` / ``write_json_atomic``: a temporary file in the same folder, fsync, then ``os.replace``
  (or, ``exclusive``, a ``link`` that refuses to replace an existing file); a crash leaves the old file or the new
  one, never a partial one; JSON is strict (no NaN/inf). Modes follow the umask. Temporaries carry the writer's pid,
  so ``remove_stale_temporaries`` can delete those of dead writers when the same output is written again.
- ``staged_folder(out)``: build a new output folder under a temporary sibling name, renamed onto ``out`` only when
  the block succeeds (removed when it fails), so ``out`` is either absent or complete.
- ``open_run_folder(out, record_file, identity, record)``: create a resumable run folder holding ``record_file``, or
  reopen one whose stored identity equals ``identity`` (else refuse, naming the keys that differ).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

from safediff.errors import SafediffError
from safediff.hashing import canonical_json


def _umask() -> int:
    """The process umask; read from /proc where the kernel reports it, since setting it to read it back leaves a
    moment in which another thread's files would be created with umask 0."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | Path, data: bytes, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file. ``exclusive``: never replace an existing file, even one
    another process created meanwhile (``FileExistsError``; the check and the creation are one ``link``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path, name: str) -> None:
    """Delete what interrupted writes of ``name`` left in ``folder`` (temporary files, partial folders) whose
    writing process is gone (its pid is in their names)."""
    for leftover in Path(folder).glob(f".{glob_escape(name)}.*"):
        parts = leftover.name[len(name) + 2:].split(".")
        pid = parts[0].removeprefix("partial-")
        if pid.isdigit() and not _alive(int(pid)):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def check_writable(path: str | Path) -> None:
    """Fail now, not after an hour of work, when ``path`` cannot be created (one clear line)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SafediffError(f"'{path}' cannot be written ({e.strerror}); give a writable location") from None


def write_json_atomic(path: str | Path, data) -> None:
    """Write strict JSON (a NaN or infinity is an error, never a bare ``NaN`` token) so that a crash leaves either
    the old file or the new one, never a partial file."""
    write_bytes_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str, allow_nan=False).encode())


def png_bytes(image) -> bytes:
    """A PIL image as PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@contextlib.contextmanager
def staged_folder(out: str | Path):
    """Yield a temporary sibling of ``out`` to fill; on success it becomes ``out`` (which must be absent or an empty
    folder), on failure it is removed. An unusable ``out`` -> SafediffError before anything is written."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SafediffError(f"--out '{out}' exists and is not an empty folder; choose a new folder")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(parent, out.name)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.partial-{os.getpid()}."))
    except OSError as e:
        raise SafediffError(f"--out '{out}' is not writable: {e.strerror}") from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result follows the umask
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def differences(old, new, prefix: str = "") -> list[str]:
    """Dotted keys at which two JSON-able values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += differences(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if canonical_json(old) == canonical_json(new) else [prefix or "(root)"]


def open_run_folder(out: str | Path, record_file: str, identity: dict, record: dict, what: str,
                    units: tuple[str, ...]) -> bool:
    """Create ``out`` holding ``record_file`` (``record``, whose ``"identity"`` is ``identity``), or reopen a folder
    made with exactly that identity. Returns True when created. A folder whose run finished no unit yet (nothing
    matches the globs ``units``: a run that failed before its first result) is not a run yet: it takes the new
    identity. Another identity, a foreign non-empty folder, a file or an unwritable path -> SafediffError naming
    what differs."""
    out = Path(out)
    path = out / record_file
    if out.exists() and not out.is_dir():
        raise SafediffError(f"--out '{out}' exists and is not a folder; give a new folder or an earlier {what}")
    if path.is_file():
        started = any(any(out.glob(g)) for g in units)
        try:
            old = json.loads(path.read_text())["identity"]
        except (ValueError, KeyError, TypeError):
            if started:
                raise SafediffError(f"'{path}' is unreadable; '{out}' is not a safediff {what}") from None
            old = None
        diff = differences(json.loads(canonical_json(old)), json.loads(canonical_json(identity)))
        if diff and started:
            shown = ", ".join(diff[:4]) + (f" (+{len(diff) - 4} more)" if len(diff) > 4 else "")
            raise SafediffError(f"{what} '{out}' was made with a different protocol (differs in: {shown}); use a "
                                "new --out folder or the original settings")
        if diff:
            write_json_atomic(path, record)
        return False
    if out.exists() and any(out.iterdir()):
        raise SafediffError(f"--out '{out}' is a non-empty folder that is not a safediff {what} (no {record_file}); "
                            "choose a new folder")
    try:
        write_json_atomic(path, record)
    except OSError as e:
        raise SafediffError(f"--out '{out}' is not writable: {e.strerror}") from None
    return True


def remove_partial_writes(*folders: Path) -> None:
    """Delete the temporary files an interrupted atomic write left behind."""
    for folder in folders:
        for tmp in Path(folder).glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
