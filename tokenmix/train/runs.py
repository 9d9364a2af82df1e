"""Run records: ``runs/<run_id>/`` with ``config.json``, ``metrics.jsonl`` (one line per epoch),
``summary.json``, ``checkpoint.pt`` and, for papermill runs, the executed notebook.

* **Atomic writes.** Every file is written to a temporary file in the same folder, fsynced and
  renamed (``os.replace``), so a crash never leaves a half-written record. Files follow the
  user's umask (0644 under 022), so a shared results folder stays readable.
* **One writer per run.** :class:`RunLock` is an exclusive lock of the run folder (``.lock``, a
  ``filelock`` lock: released by the kernel when its process dies) with an owner record
  (``.lock-owner.json``: host, pid, start time) that a refused process names; a lock left by a
  dead process is taken over with a message. Sweep workers claim cells with it; the process a
  claiming worker starts for the cell joins the claim through :data:`LOCK_TOKEN_ENV`.
* **Damaged files are named.** Every reader raises :class:`DamagedRecordError` (one line: the
  file, what is wrong, what to do) instead of a parser's traceback; :func:`list_runs` skips a
  damaged run with a :class:`RecordWarning`; a torn last line of ``metrics.jsonl`` is recovered
  from the checkpoint's history.

Report code reads only these files.
"""
from __future__ import annotations

import io
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout, UnixFileLock

#: the lock class: flock on POSIX (released by the kernel when its process dies; no silent soft-lock
#: fallback), the platform's native lock elsewhere
_LockClass = UnixFileLock if os.name == "posix" else FileLock
#: seconds a lock attempt waits: long enough that a probe (``lock_holder``) never refuses a real
#: claim, short enough that a refusal is immediate for a user
LOCK_WAIT = 1.0

CONFIG, METRICS, SUMMARY, CHECKPOINT = "config.json", "metrics.jsonl", "summary.json", "checkpoint.pt"
LOCK, LOCK_OWNER = ".lock", ".lock-owner.json"
#: the environment variable through which a process started for a claimed run joins the claim
LOCK_TOKEN_ENV = "TOKENMIX_LOCK_TOKEN"
#: config fields that may differ between a record and a command that continues or reuses it
#: (they do not change the result); every other field, ``epochs`` included, must match
RESUME_FREE: tuple[str, ...] = ("resume", "progress", "num_workers", "threads", "device", "data_dir", "download",
                                "out_dir")


def epoch_checkpoint_name(epoch: int) -> str:
    """The file of the weights kept after ``epoch`` (``RunConfig.checkpoint_every``)."""
    return f"checkpoint-e{epoch:04d}.pt"


class RunExistsError(FileExistsError):
    """The output folder already holds a run that this call must not overwrite."""


class RunLockedError(RuntimeError):
    """Another live process holds the run folder's lock (the message names it)."""


class DamagedRecordError(ValueError):
    """A record file cannot be read; the message names the file, the fault and what to do."""


class RecordWarning(UserWarning):
    """A damaged record was skipped or repaired in memory by a reader."""


def folder_problem(path: str | Path) -> str:
    """Why files cannot be written under the folder ``path`` (made if missing), or "" when they can:
    its nearest existing ancestor must be a writable folder."""
    here = Path(path).expanduser().absolute()
    for d in (here, *here.parents):
        if d.exists():
            if not d.is_dir():
                return f"{d} is a file, not a folder, so {here} cannot be made"
            if not os.access(d, os.W_OK | os.X_OK):
                return f"{d} is not writable by this user, so nothing can be written under {here}"
            return ""
    return ""


def _tmp_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old or the new file, never a part
    (the file's mode follows the umask, as for ``open``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def write_metrics(path: str | Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` from the full history (kept in the checkpoint, so the two agree)."""
    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in history).encode())


def git_commit(cwd: str | Path | None = None) -> str:
    """The current git commit (with ``-dirty`` when the tree has changes), or "unknown"."""
    try:
        here = cwd or Path(__file__).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class Run:
    """A run record loaded from disk."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def complete(self) -> bool:
        return bool(self.summary) and self.summary.get("status") == "complete"

    def epoch_checkpoints(self) -> dict[int, Path]:
        """{epoch: file} of the weights kept during training (``RunConfig.checkpoint_every``)."""
        out = {}
        for f in sorted(self.path.glob("checkpoint-e*.pt")):
            try:
                out[int(f.stem.split("-e")[1])] = f
            except ValueError:
                continue
        return out

    @property
    def has_checkpoint(self) -> bool:
        """Complete, with its final ``checkpoint.pt`` (a model that can be evaluated)."""
        return self.complete and (self.path / "checkpoint.pt").is_file()


def read_json(path: str | Path, what: str = "record") -> Any:
    """The JSON content of ``path``; a file that does not parse raises :class:`DamagedRecordError`."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedRecordError(f"{path} is damaged (not valid JSON: {e}); {_advice(path, what)}") from None


def _advice(path: Path, what: str) -> str:
    if path.name == SUMMARY:
        return ("delete it and resume the run (`--resume true`, or re-run the sweep) to finish it again "
                "from its checkpoint")
    if path.name == CONFIG:
        return f"move the folder {path.parent} away: without its config the run cannot be resumed or reported"
    if path.name == CHECKPOINT:
        return ("an unfinished run: delete it to retrain the run from epoch 1 with the same config "
                "(`--resume true`); a finished run's record stays usable without it (only checkpoint analyses "
                "need it); or restore it from a copy")
    return f"restore the {what} from a copy or delete it"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load`` of a checkpoint; a truncated or corrupted file raises :class:`DamagedRecordError`."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 -- torch raises many types (RuntimeError, EOFError, UnpicklingError, ...)
        raise DamagedRecordError(f"{path} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                                 f"{_advice(path, 'checkpoint')}") from None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The epoch records of ``metrics.jsonl``. A torn last line (a copy or a disk cut short) is
    recovered from ``checkpoint.pt``'s history when the checkpoint has it, else dropped, with a
    :class:`RecordWarning` either way; a bad line before the last raises :class:`DamagedRecordError`."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    out = []
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError(f"a {type(rec).__name__}, not an epoch record")
        except ValueError as e:
            if n < len(lines):
                raise DamagedRecordError(f"{path} is damaged (line {n} of {len(lines)}: {e}); an unfinished run: "
                                         f"resume it (`--resume true`) to rewrite the file from the checkpoint; "
                                         f"a finished one: restore it from a copy") from None
            ckpt = Path(run_dir) / CHECKPOINT
            history = load_checkpoint(ckpt).get("history") if ckpt.is_file() else None
            if history and len(history) >= len(lines):
                warnings.warn(f"{path}: the last line is torn; the {len(history)} epoch records were recovered "
                              f"from {ckpt.name}", RecordWarning, stacklevel=2)
                return list(history)
            warnings.warn(f"{path}: the last line ({n}) is torn and no checkpoint holds it; it is left out",
                          RecordWarning, stacklevel=2)
            break
        out.append(rec)
    return out


def load_run(path: str | Path, metrics: bool = True) -> Run:
    """Read a run folder; ``metrics=False`` leaves ``metrics.jsonl`` unread (``Run.metrics`` empty:
    what deciding to start, resume or skip a run needs, so that a resume can rewrite a damaged
    metrics file from the checkpoint).

    Raises:
        FileNotFoundError: it has no ``config.json``.
        DamagedRecordError: a record file does not parse (the message names it and what to do).
    """
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path} holds no run record ({CONFIG} missing)")
    config = read_json(path / CONFIG, "config")
    summary = read_json(path / SUMMARY, "summary") if (path / SUMMARY).is_file() else None
    check_record(path, config, summary)
    return Run(path, config, read_metrics(path) if metrics else [], summary)


#: what every ``config.json`` holds, and a complete ``summary.json`` (with its value types)
CONFIG_KEYS: tuple[str, ...] = ("method",)
#: numbers of a complete summary that must be numbers where present
SUMMARY_KEYS: dict[str, tuple[type, ...]] = {"final_top1": (int, float), "epochs": (int,)}


def check_record(path: Path, config: Any, summary: Any) -> None:
    """Raise :class:`DamagedRecordError` when ``config.json`` or ``summary.json`` parse but are not
    a run's record (not an object, fields missing, a complete summary without its numbers)."""
    for name, obj in ((CONFIG, config), (SUMMARY, summary)):
        if obj is not None and not isinstance(obj, dict):
            raise DamagedRecordError(f"{path / name} is damaged (a JSON {type(obj).__name__}, not an object); "
                                     f"{_advice(path / name, name)}")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise DamagedRecordError(f"{path / CONFIG} is damaged (no {', '.join(missing)}); {_advice(path / CONFIG, 'config')}")
    if summary and summary.get("status") == "complete":
        bad = [k for k, t in SUMMARY_KEYS.items()
               if k in summary and (not isinstance(summary[k], t) or isinstance(summary[k], bool))]
        if bad:
            raise DamagedRecordError(f"{path / SUMMARY} is damaged (status complete but {', '.join(bad)} not a "
                                     f"number); {_advice(path / SUMMARY, 'summary')}")


def checkpoint_readable(path: str | Path) -> bool:
    """Whether a checkpoint file is a whole archive (``torch.save``'s zip: its central directory
    at the end is present), checked without loading it."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return bool(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def list_runs(root: str | Path = "runs", damaged: str = "warn") -> list[Run]:
    """Every run record under ``root`` (folders without ``config.json`` are skipped), sorted by id.

    Args:
        damaged: what a damaged record does: ``"warn"`` (skipped with a :class:`RecordWarning`
            naming the file) or ``"raise"`` (:class:`DamagedRecordError`).
    """
    if damaged not in ("warn", "raise"):
        raise ValueError(f"damaged must be 'warn' or 'raise', got {damaged!r}")
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        if not (p / CONFIG).is_file():
            continue
        try:
            out.append(load_run(p))
        except DamagedRecordError as e:
            if damaged == "raise":
                raise
            warnings.warn(f"skipped run {p.name}: {e}", RecordWarning, stacklevel=2)
    return out


def config_diff(stored: Mapping[str, Any], wanted: Mapping[str, Any],
                defaults: Mapping[str, Any] | None = None) -> dict[str, tuple[Any, Any]]:
    """{field: (stored, wanted)} for every field outside :data:`RESUME_FREE` that differs, i.e. that
    would change the result. A field missing from ``stored`` (a record older than the field) counts
    as its value in ``defaults`` (the behaviour the record was made with)."""
    defaults = defaults or {}
    out = {}
    for k, v in wanted.items():
        if k in RESUME_FREE:
            continue
        have = stored[k] if k in stored else defaults.get(k)
        if have != v:
            out[k] = (stored.get(k, "<not recorded>"), v)
    return out


def format_diff(diff: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} (recorded {a!r}, now {b!r})" for k, (a, b) in diff.items())


# ---------------------------------------------------------------------------------------------
# the run folder's lock

_TOKEN = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(6)}"


def process_token() -> str:
    """This process's lock token (host, pid and a random part)."""
    global _TOKEN
    if _TOKEN.split(":")[1] != str(os.getpid()):  # a forked child gets its own
        _TOKEN = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(6)}"
    return _TOKEN


def describe_owner(owner: Mapping[str, Any] | None) -> str:
    if not owner:
        return "another process (which has not written its owner record yet)"
    return (f"process {owner.get('pid')} on host {owner.get('host')} (since {owner.get('since')}: "
            f"{owner.get('command', '')[:120]})")


def read_owner(run_dir: str | Path) -> dict[str, Any] | None:
    """The owner record of a run folder's lock, or None (none written, or unreadable)."""
    try:
        owner = json.loads((Path(run_dir) / LOCK_OWNER).read_text())
        return owner if isinstance(owner, dict) else None
    except (OSError, ValueError):
        return None


class RunLock:
    """The exclusive lock of one run folder: taken before any file of the run is written, held
    while the run trains, released (and its owner record removed) at the end.

    ``acquire()`` creates the folder if needed, takes ``<run_dir>/.lock`` without waiting and
    writes the owner record. A folder locked by a live process raises :class:`RunLockedError`
    naming it; a lock whose owner record outlived its process (killed) is taken over with a
    message. ``release()`` removes a folder that it created and that still holds only the lock's
    files (a run refused after the lock leaves nothing behind).

    Example::

        with RunLock("runs/my-run"):
            ...  # the only process writing runs/my-run
    """

    def __init__(self, run_dir: str | Path, log: Any = None) -> None:
        self.run_dir = Path(run_dir)
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.took_over: dict[str, Any] | None = None
        self._lock: Any = None
        self._created = False

    @property
    def held(self) -> bool:
        return self._lock is not None

    def acquire(self) -> "RunLock":
        if self._lock is not None:
            return self
        for _ in range(20):  # a holder that made the folder may remove it (empty) while we wait: retry
            try:
                self.run_dir.mkdir(parents=True)
                created = True
            except FileExistsError:
                created = False
            lock = _LockClass(str(self.run_dir / LOCK), timeout=LOCK_WAIT)
            try:
                lock.acquire()
                break
            except Timeout:
                raise RunLockedError(f"{self.run_dir} is in use by {describe_owner(read_owner(self.run_dir))}; wait "
                                     f"for it to finish or stop it (two processes on one run would mix their "
                                     f"records)") from None
            except FileNotFoundError:
                continue
        else:
            raise RunLockedError(f"{self.run_dir}: the folder kept disappearing while its lock was taken "
                                 f"(other processes claiming and removing it); try again")
        # a folder holding nothing but the lock is no run's (ours, or made by a claimant that lost the
        # race): it is removed again at release if it is still empty then
        self._created = created or {q.name for q in self.run_dir.iterdir()} <= {LOCK, LOCK_OWNER}
        previous = read_owner(self.run_dir)
        me = process_token()
        if previous and previous.get("token") != me:
            # we hold the flock, so its previous holder is gone (killed, or its pid now another process's)
            self.took_over = previous
            self.log(f"[tokenmix] {self.run_dir}: taking over the lock left by {describe_owner(previous)}, "
                     f"which no longer holds it (the process ended without releasing it)")
        try:
            atomic_write_json(self.run_dir / LOCK_OWNER, {
                "host": socket.gethostname(), "pid": os.getpid(), "token": me,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv)})
        except BaseException:
            lock.release()
            raise
        self._lock = lock
        return self

    def release(self) -> None:
        if self._lock is None:
            return
        (self.run_dir / LOCK_OWNER).unlink(missing_ok=True)
        if self._created and {p.name for p in self.run_dir.iterdir()} <= {LOCK}:
            # a folder this process made that holds nothing but the lock (a run refused after the
            # lock): removed while still held (a process that opened the old file finds it unlinked
            # and retries on a new one), so nothing is left behind
            (self.run_dir / LOCK).unlink(missing_ok=True)
            self._lock.release()
            try:
                self.run_dir.rmdir()
            except OSError:
                pass
        else:
            self._lock.release()
        self._lock = None
        self._created = False

    def verify(self) -> None:
        """Nothing to check: this process holds the lock (the same call as :meth:`JoinedClaim.verify`)."""
        if self._lock is None:
            raise RunLockedError(f"{self.run_dir}: the lock is not held")

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_holder(run_dir: str | Path) -> dict[str, Any] | None:
    """The owner record of a live lock on ``run_dir`` ({} when it has none yet), or None when the
    folder is free. Creates no file; to probe, it takes the lock for an instant (a real claim
    waits :data:`LOCK_WAIT` seconds, so a probe never makes it fail)."""
    path = Path(run_dir) / LOCK
    if not path.is_file():
        return None
    lock = _LockClass(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return read_owner(run_dir) or {}
    except OSError:  # e.g. a read-only shared folder: the lock cannot be probed
        return None
    lock.release()
    return None


class JoinedClaim:
    """The claim of a process started for a run that its parent (a sweep worker) holds: it writes
    under the parent's lock. :meth:`verify` (called before every record write) keeps it safe when
    the parent dies first: the run's lock is then taken by this process, or, if another process
    got it, :class:`RunLockedError` stops this one before it writes."""

    def __init__(self, run_dir: str | Path, owner: Mapping[str, Any], log: Any = None) -> None:
        self.run_dir, self.owner, self.log = Path(run_dir), dict(owner), log
        self.lock: RunLock | None = None

    def verify(self) -> None:
        if self.lock is not None:
            return
        holder = lock_holder(self.run_dir)
        if holder is not None and holder.get("token") == self.owner.get("token"):
            return  # the parent still holds the run
        try:
            self.lock = RunLock(self.run_dir, self.log).acquire()
        except RunLockedError as e:
            raise RunLockedError(f"the process that started this run ({describe_owner(self.owner)}) has ended and "
                                 f"another one holds {self.run_dir} now; stopping without writing ({e})") from None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


@contextmanager
def claim_run(run_dir: str | Path, log: Any = None) -> Iterator[RunLock | JoinedClaim]:
    """Hold ``run_dir`` for this process: its :class:`RunLock`, or a :class:`JoinedClaim` when the
    lock is held by the process that started this one for this run (a sweep worker, whose token
    is in :data:`LOCK_TOKEN_ENV`). Call ``verify()`` on it before each write. Raises
    :class:`RunLockedError` when anyone else holds the run."""
    lock = RunLock(run_dir, log)
    try:
        lock.acquire()
    except RunLockedError:
        owner = read_owner(run_dir)
        if not (owner and os.environ.get(LOCK_TOKEN_ENV) and owner.get("token") == os.environ[LOCK_TOKEN_ENV]):
            raise
        joined = JoinedClaim(run_dir, owner, log)  # the claim of our parent covers us
        try:
            yield joined
        finally:
            joined.release()
        return
    try:
        yield lock
    finally:
        lock.release()
