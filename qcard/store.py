"""Point folders and caches on disk. Every write is atomic: a temporary file, then os.replace.

A run killed at any moment leaves each file either absent or complete; a rerun skips points whose
card.json validates against the card schema and says "ok", and redoes the rest. Files get the
permissions of the umask (as open() would give them), so others can read a shared --out.

Several `qcard run` processes (or Ray tasks of two sweeps) may write into one --out: a point is run only
by the holder of its lock (PointLock: a file created exclusively, which works on NFS, whose mtime a
heartbeat renews); a lock whose owner died, or whose heartbeat stopped, is taken over.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import yaml

from .errors import QcardError

CARD_FILE = "card.json"
POINT_FILE = "point.yaml"
TMP_PREFIX = ".tmp-"
LOCK_FILE = ".qcard-lock"
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (reading it means setting it: done under a lock, restored at once)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode open() gives a new file: 0666 less the umask (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        os.fchmod(fd, file_mode())          # mkstemp makes it 0600: others could not read the result
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


class RunStore:
    """OUT/EXPERIMENT/<point folder>/{point.yaml, card.json, card.md, error.log}; OUT/.cache/ for baselines.
    point.yaml: the point's canonical config (what its id hashes) and `index`, its place in the config's order."""

    def __init__(self, root: Path, cache_root: Optional[Path] = None):
        self.root = Path(root)
        self.cache = Path(cache_root) if cache_root else self.root.parent / ".cache"

    def point_dir(self, folder: str) -> Path:
        return self.root / folder

    def clean_partial(self, folder: str) -> int:
        """Remove temporary files a killed run left behind; returns how many."""
        d = self.point_dir(folder)
        n = 0
        if d.is_dir():
            for p in d.glob(TMP_PREFIX + "*"):
                p.unlink(missing_ok=True)
                n += 1
        return n

    def finished_card(self, folder: str, point_id: str) -> Optional[Dict[str, Any]]:
        return self.card_state(folder, point_id)[0]

    def card_state(self, folder: str, point_id: str) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
        """(card, None) for a finished point; (None, why) when a card is there but cannot count as
        finished (unreadable, not a valid card, another point's); (None, None) for no card or a failed one.
        Only a card that validates marks a point finished: compare and render reject the others."""
        from .cards.schema import card_from_dict
        path = self.point_dir(folder) / CARD_FILE
        if not path.exists():
            return None, None
        card = read_json(path)
        if card is None:
            return None, f"{path} is not readable JSON"
        try:
            card_from_dict(card, str(path))
        except QcardError as exc:
            return None, str(exc)
        if card.get("id") != point_id:
            return None, f"{path} holds another point's card (id {str(card.get('id'))[:10]})"
        return (card, None) if card.get("status") == "ok" else (None, None)

    def lock(self, folder: str) -> PointLock:
        return PointLock(self.point_dir(folder))

    def write_point_config(self, folder: str, canonical: Dict[str, Any]) -> None:
        atomic_write_text(self.point_dir(folder) / POINT_FILE, yaml.safe_dump(canonical, sort_keys=True))

    def write_card(self, folder: str, card_json: str) -> Path:
        path = self.point_dir(folder) / CARD_FILE
        atomic_write_text(path, card_json)
        return path

    def write_text(self, folder: str, name: str, text: str) -> Path:
        path = self.point_dir(folder) / name
        atomic_write_text(path, text)
        return path

    # FP32 baselines are keyed by a fingerprint of weights, data split and preprocessing
    def baseline(self, fingerprint: str) -> Optional[Dict[str, Any]]:
        return read_json(self.cache / "fp32" / f"{fingerprint}.json")

    def save_baseline(self, fingerprint: str, result: Dict[str, Any]) -> None:
        atomic_write_json(self.cache / "fp32" / f"{fingerprint}.json", result)


# ------------------------------------------------------------------ per-point locks

HEARTBEAT_S = 10.0


def stale_after_s() -> float:
    """A lock whose heartbeat is older than this is taken over (QCARD_LOCK_STALE_S; default 120 s, well
    above the heartbeat, so clock skew between NFS clients does not break a live lock)."""
    try:
        return max(1.0, float(os.environ.get("QCARD_LOCK_STALE_S", "120")))
    except ValueError:
        return 120.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # someone else's live process
        return True
    return True


class PointLock:
    """The lock of one point folder: OUT/EXP/POINT/.qcard-lock, created with O_EXCL, holding the owner's
    host, pid and a token. A heartbeat thread (one per process) renews the mtime of every held lock."""

    _held: Dict[str, "PointLock"] = {}
    _guard = threading.Lock()
    _beat: Optional[threading.Thread] = None

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self.token = uuid.uuid4().hex
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token}

    def describe_holder(self) -> str:
        holder = read_json(self.path) or {}
        return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"

    def acquire(self) -> Tuple[bool, Optional[str]]:
        """(True, note) when this process now holds the lock (note: a stale lock that was taken over);
        (False, holder) when a live owner holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = None
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return True, note
            why = self._stale_reason()
            if why is None:
                return False, self.describe_holder()
            if self._break(why[1]):
                note = f"took over a stale lock ({why[0]})"
        return False, self.describe_holder()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, file_mode())
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(self.owner, fh)
        return True

    def _stale_reason(self) -> Optional[Tuple[str, Optional[str]]]:
        """(why, the stale owner's token) when the lock there may be taken over; None when it is live."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "released", None
        holder = read_json(self.path)
        if holder is None:                 # being written, or garbage: judge by age alone
            return (f"unreadable, {age:.0f} s old", None) if age > stale_after_s() else None
        if holder.get("host") == self.owner["host"] and isinstance(holder.get("pid"), int) \
                and not _pid_alive(holder["pid"]):
            return f"pid {holder['pid']} on this host is gone", holder.get("token")
        if age > stale_after_s():
            return f"no heartbeat from pid {holder.get('pid')} on {holder.get('host')} for {age:.0f} s", \
                holder.get("token")
        return None

    def _break(self, token: Optional[str]) -> bool:
        """Move the stale lock aside (rename is atomic: of two processes breaking it, one wins); if what was
        moved is not the stale lock (another process took it over meanwhile), put it back."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = read_json(aside) or {}
        if token is not None and moved.get("token") not in (token, None):
            try:
                os.link(aside, self.path)      # fails if a third process created a lock meanwhile
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def still_held(self) -> bool:
        return (read_json(self.path) or {}).get("token") == self.token

    def release(self) -> None:
        with PointLock._guard:
            PointLock._held.pop(self.token, None)
        if self.still_held():
            self.path.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        with PointLock._guard:
            PointLock._held[self.token] = self
            if PointLock._beat is None or not PointLock._beat.is_alive():
                PointLock._beat = threading.Thread(target=PointLock._heartbeat, daemon=True,
                                                   name="qcard-lock-heartbeat")
                PointLock._beat.start()

    @staticmethod
    def _heartbeat() -> None:
        while True:
            time.sleep(min(HEARTBEAT_S, stale_after_s() / 4))
            with PointLock._guard:
                held = list(PointLock._held.values())
            for lock in held:
                try:
                    os.utime(lock.path)
                except OSError:
                    pass
