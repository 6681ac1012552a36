"""Checkpoints inside a point: a long training or iterative method killed (SIGKILL, Ctrl-C, a lost Ray
task) resumes where it stopped, and ends with the same results as a run that was never interrupted.

The generic API, for any loop that runs in steps (qcard.training.train uses it, and so does the
reconstruction engine, quant.reconstruct, in a stage of each step: adaround, brecq, qdrop):

    ck = ctx.checkpoint                   # a Checkpointer, or None when the run keeps no checkpoints
    state = ck.load() if ck else None     # the last saved state, or None (none / unreadable / another config)
    if state is not None:
        ...restore everything from state; continue after state's step...
    for step in ...:
        ...one step...
        if ck and ck.due(step, last=step == total):
            ck.save(step, {"model": model.state_dict(), "rng": rng_state(), ...})

A method with several loops (a reconstruction before a fine-tune) gives each its own file:
`ck.stage("adaround")` is a Checkpointer of its own (checkpoint-<tag>-adaround.pt, its own fingerprint),
so one loop never reads another's state; `ck.resumed()` lists every stage that resumed.

What is saved must be what torch.load(weights_only=True) reads back: tensors, numbers, strings, bools,
None, and lists/tuples/dicts of them (rng_state() and generator_state() give the RNGs in that form).
A file holds a SHA-256 of its payload and a fingerprint of the run (the runner hashes the point id, the
seed, the weights' content and the qcard/torch versions): a truncated or corrupt file, or one of another
config, is ignored with a warning and the run starts from step 0 — it is never loaded in part.

Writes are atomic (a temporary file in the same folder, fsync, rename) with the umask's permissions.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Optional

__all__ = ["Checkpointer", "rng_state", "set_rng_state", "generator_state", "set_generator_state",
           "ResumableShuffle", "remove_checkpoints", "CHECKPOINT_GLOB", "KILL_ENV"]

FORMAT = 1
PREFIX = "checkpoint-"
CHECKPOINT_GLOB = PREFIX + "*.pt"
TMP_PREFIX = ".tmp-"          # the store's prefix of partial files: a killed write is removed by clean_partial
KILL_ENV = "QCARD_TEST_KILL_AFTER_CHECKPOINT"   # test hook: SIGKILL this process after the k-th checkpoint write
_MAGIC = b"qcard-checkpoint"


class Checkpointer:
    """The checkpoints of one run (one seed of a point) in `folder`: checkpoint-<tag>.pt, replaced by
    each save. every_steps / every_minutes: when due() says a save is due (either may be None; both None:
    only the last step is saved). fingerprint: what the run depends on; a file of another fingerprint is
    never loaded. log: where warnings go."""

    def __init__(self, folder, tag: str, fingerprint: str, *, every_steps: Optional[int] = None,
                 every_minutes: Optional[float] = None, log: Callable[[str], None] = print):
        self.path = Path(folder) / f"{PREFIX}{tag}.pt"
        self.fingerprint, self.every_steps, self.every_minutes, self.log = fingerprint, every_steps, every_minutes, log
        self.resumed_from: Optional[Dict[str, Any]] = None     # {"step": n} once load() returned a state
        self.saves = 0
        self._last_save = time.monotonic()
        self._tag, self._stages = tag, []

    def stage(self, name: str) -> "Checkpointer":
        """The Checkpointer of one named loop of the run (its own file and fingerprint, same schedule)."""
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"a checkpoint stage name is letters, digits, '_' and '-'; got {name!r}")
        sub = Checkpointer(self.path.parent, f"{self._tag}-{name}", hashlib.sha256(
            f"{self.fingerprint}/{name}".encode()).hexdigest(), every_steps=self.every_steps,
            every_minutes=self.every_minutes, log=self.log)
        self._stages.append((name, sub))
        return sub

    def resumed(self):
        """[{step} and, for a stage, {stage, step}] of every loop of this run that went on from a checkpoint."""
        out = [dict(self.resumed_from)] if self.resumed_from is not None else []
        return out + [{"stage": name, **r} for name, sub in self._stages for r in sub.resumed()]

    # -- reading -------------------------------------------------------------------------------
    def load(self) -> Optional[Dict[str, Any]]:
        """The state of the last save, or None: no file, or one that is unreadable, truncated, corrupt,
        of another format or of another run's fingerprint (each said in a warning; the run restarts)."""
        if not self.path.exists():
            return None
        try:
            payload = _read(self.path)
        except Exception as exc:
            self._ignore(f"it cannot be read ({type(exc).__name__}: {exc})")
            return None
        if payload.get("format") != FORMAT:
            self._ignore(f"it has format {payload.get('format')!r}, this qcard reads format {FORMAT}")
            return None
        if payload.get("fingerprint") != self.fingerprint:
            self._ignore("it was written by a run of another config (its fingerprint differs)")
            return None
        if not isinstance(payload.get("state"), dict) or not isinstance(payload.get("step"), int):
            self._ignore("it holds no step and state")
            return None
        self.resumed_from = {"step": payload["step"]}
        return payload["state"]

    def _ignore(self, why: str) -> None:
        self.log(f"warning: checkpoint {self.path} ignored: {why}; the run starts from step 0")

    def restore_failed(self, exc: BaseException) -> None:
        """A state load() returned could not be applied (the caller rolled back): say so, start over."""
        self.resumed_from = None
        self._ignore(f"its state does not fit this run ({type(exc).__name__}: {exc})")

    # -- writing -------------------------------------------------------------------------------
    def due(self, step: int, *, last: bool = False) -> bool:
        """Whether a save is due after `step` (1-based): every every_steps steps, after every_minutes
        since the last save, and at the last step (a run killed after it skips its whole loop)."""
        if last:
            return True
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_minutes) and time.monotonic() - self._last_save >= 60.0 * self.every_minutes

    def save(self, step: int, state: Dict[str, Any]) -> None:
        """Write {step, state} atomically, replacing the previous checkpoint."""
        import torch
        buf = io.BytesIO()
        torch.save({"format": FORMAT, "fingerprint": self.fingerprint, "step": int(step), "state": state}, buf)
        body = buf.getvalue()
        _atomic_write(self.path, _MAGIC + b" " + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
        self._last_save = time.monotonic()
        self.saves += 1
        kill_after = os.environ.get(KILL_ENV)
        if kill_after and self.saves == int(kill_after):
            import signal
            os.kill(os.getpid(), signal.SIGKILL)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def remove_checkpoints(folder) -> int:
    """Delete every checkpoint in a point folder (after its card is written); returns how many."""
    n = 0
    for p in Path(folder).glob(CHECKPOINT_GLOB):
        p.unlink(missing_ok=True)
        n += 1
    return n


def _read(path: Path) -> Dict[str, Any]:
    import torch
    raw = path.read_bytes()
    head, sep, body = raw.partition(b"\n")
    parts = head.split(b" ")
    if not sep or len(parts) != 2 or parts[0] != _MAGIC:
        raise ValueError("not a qcard checkpoint (no header)")
    if hashlib.sha256(body).hexdigest().encode() != parts[1]:
        raise ValueError(f"its content does not match its SHA-256 ({len(body):,} bytes: truncated or corrupt)")
    payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict):
        raise ValueError("its payload is not a dict")
    return payload


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}{path.suffix}"
    # os.open with 0o666 applies the umask, as open() does for every other file qcard writes
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:                            # the rename itself survives a power cut once the folder is synced
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


# ----------------------------------------------------------------------------- random states

def rng_state() -> Dict[str, Any]:
    """The global random states (python, numpy, torch CPU, and CUDA where initialized) as tensors and lists."""
    import numpy as np
    import torch
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state(),
           "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                     "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = list(torch.cuda.get_rng_state_all())
    return out


def set_rng_state(state: Dict[str, Any]) -> None:
    import numpy as np
    import torch
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def generator_state(gen) -> Any:
    """A torch.Generator's state (a CPU byte tensor), or None for no generator."""
    return None if gen is None else gen.get_state()


def set_generator_state(gen, state) -> None:
    if gen is not None and state is not None:
        gen.set_state(state)


# ----------------------------------------------------------------------------- data order

class ResumableShuffle:
    """A sampler that shuffles like torch's RandomSampler with a generator (the same draws from it, so
    the same order), and can start an epoch part-way: `start_at(k)` makes the next epoch skip its first
    k indices without loading them (a resumed run goes on mid-epoch). The DataLoader must share its
    generator (it draws the workers' base seed from it first)."""

    def __init__(self, n: int, generator):
        self.n, self.generator, self.skip = int(n), generator, 0

    def __len__(self) -> int:
        return self.n

    def start_at(self, k: int) -> None:
        self.skip = int(k)

    def __iter__(self):
        import torch
        order = torch.randperm(self.n, generator=self.generator).tolist()
        # RandomSampler draws a second permutation for its (empty) remainder when it runs out: drawn here
        # too, so the generator, and every later epoch's order, is the same as with RandomSampler
        torch.randperm(self.n, generator=self.generator)
        skip, self.skip = self.skip, 0
        return iter(order[skip:])
