"""`qcard verify`: rerun each card's point from the card alone and say whether its numbers hold.

The card carries a config of its point alone (`card.point["config"]`, from `Point.as_config`); it is loaded
with `config_from_dict`, must give one point with the card's id, and runs through the runner's Python API
into a temporary folder, with the card's torch thread count. Then, per card:

- the card against its own evidence (cards.evidence): every top-1, Δ, std and interval recomputed from its
  per-sample outcomes; a mismatch fails the card whatever the rerun gives.
- the rerun against the card, image by image: per seed and for FP32, how many eval images changed outcome
  (right on the card and wrong in the rerun, or the reverse) and the exact McNemar p of that change. A
  rerun scores the same images, so this, not an interval over image draws, is the evidence.
- the top-1 figures (headline, FP32, Δ, each seed) card beside rerun; top-5 shown where it differs.
- cost totals (every profile) and the quantization block: identical, or the fields that differ are named.
- the environment (software, CPU, threads, code) of the card and of this machine, and what differs.

The rule (one place: `CardVerdict.ok`): on the same environment the same config gives the same outcomes, so
one changed image fails; where something in the environment differs (another CPU, torch, thread count,
code), images may change outcome as long as the change is not significant at ALPHA (exact McNemar,
two-sided, per seed and for FP32). Cost and quantization must always be identical: they do not depend on
the CPU's last bits. A card without per-sample outcomes has no image-level evidence: its top-1 figures must
be identical. Top-5 has no outcomes either: a difference fails on the same environment, elsewhere it is a
note.

A card that cannot be rerun here because an input is missing (a weights file or image folder that is not
at the path its point config names, user code that is not on PYTHONPATH) is not judged: "could not
verify", with the fix, before anything runs (the command exits 2).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .cards.compare import find_card_files
from .cards.evidence import NO_EVIDENCE, Evidence, check_card
from .cards.schema import Card, load_card
from .config import canonical_hash, config_from_dict
from .errors import QcardError
from .stats.outcomes import unpack_outcomes
from .stats.significance import discordant_counts, mcnemar_exact

ALPHA = 0.05     # the level at which a change of outcomes on another environment counts as significant
# provenance fields that can change a result's last bits (or, for the code, anything): (key, in words)
ENVIRONMENT = (("torch", "torch"), ("torchvision", "torchvision"), ("python", "Python"), ("cpu", "CPU"),
               ("torch_threads", "torch threads"), ("qcard_version", "qcard version"),
               ("git_commit", "git commit"), ("git_dirty", "uncommitted changes"))
# the inputs a card names by fingerprint: a difference means the model or the images are not the same
INPUTS = (("model.weights_sha256", "model weights (sha256)"), ("dataset.fingerprint", "eval data (fingerprint)"))


@dataclass
class Figure:
    """One accuracy figure of a card next to the rerun's."""
    field: str                            # the card's key path, e.g. results.per_seed[0].top1
    card: Optional[float]
    rerun: Optional[float]
    judged: bool = True                   # False: shown, but a difference is only a note (top-5)

    @property
    def identical(self) -> bool:
        return self.card == self.rerun

    def verdict(self) -> str:
        if self.identical:
            return "identical"
        if self.card is None:
            return "missing on the card"
        if self.rerun is None:
            return "missing in the rerun"
        return f"differs by {self.rerun - self.card:+.2f} points"


@dataclass
class ImageChange:
    """One set of outcomes (a seed's or FP32's) of the card beside the rerun's, image by image."""
    label: str                            # "FP32", "seed 0"
    n: int = 0                            # eval images
    lost: int = 0                         # right on the card, wrong in the rerun
    gained: int = 0                       # wrong on the card, right in the rerun
    problem: Optional[str] = None         # why the two could not be compared

    @property
    def changed(self) -> int:
        return self.lost + self.gained

    @property
    def p(self) -> float:
        """The exact McNemar p of the change (two-sided; 1 when nothing changed)."""
        return mcnemar_exact(self.lost, self.gained)

    @property
    def significant(self) -> bool:
        return self.p < ALPHA


@dataclass
class CardVerdict:
    path: Path
    card: Card
    problem: Optional[str] = None         # the point could not be rerun as itself (or the rerun failed)
    unverifiable: Optional[str] = None    # an input the rerun needs is not here: not judged (exit 2)
    evidence: Evidence = field(init=False)         # the card against its own outcomes (cards.evidence)
    images: List[ImageChange] = field(default_factory=list)
    figures: List[Figure] = field(default_factory=list)
    cost: List[str] = field(default_factory=list)           # "field: card X, rerun Y"
    quantization: List[str] = field(default_factory=list)
    environment: List[Tuple[str, Any, Any]] = field(default_factory=list)   # (in words, card's, this machine's)
    same: List[Tuple[str, Any]] = field(default_factory=list)               # (in words, value) that match
    rerun_folder: Optional[Path] = None

    def __post_init__(self):
        self.evidence = check_card(self.card)

    @property
    def explained(self) -> bool:
        """Something differs between the card's environment and this one that could move the last bits."""
        return bool(self.environment)

    def image_ok(self, c: ImageChange) -> bool:
        if c.problem:
            return False
        return c.changed == 0 or (self.explained and not c.significant)

    def figure_ok(self, f: Figure) -> bool:
        """A top-1 figure that agrees with the card's outcomes follows them: judged image by image, it may
        differ where the environment does. Without outcomes, or missing on either side, it must be
        identical; top-5 may differ where the environment does."""
        if f.identical:
            return True
        if f.card is None or f.rerun is None or f.field in {m.field for m in self.evidence.mismatches}:
            return False
        if not f.judged:
            return self.explained
        return self.explained and bool(self.images)

    @property
    def state(self) -> str:
        return "COULD NOT VERIFY" if self.unverifiable else "VERIFIED" if self.ok else "NOT VERIFIED"

    @property
    def ok(self) -> bool:
        return (self.problem is None and self.unverifiable is None and self.evidence.ok and not self.cost and not self.quantization
                and all(self.image_ok(c) for c in self.images) and all(self.figure_ok(f) for f in self.figures))


# ------------------------------------------------------------------ comparing


def accuracy_figures(card: Dict[str, Any], rerun: Dict[str, Any]) -> List[Figure]:
    """The card's accuracy figures beside the rerun's (seeds matched by their number)."""
    r, n = card["results"], rerun["results"]
    figures = [Figure(f"results.{key}", r.get(key), n.get(key)) for key in ("quantized", "fp32", "delta")]
    rerun_seeds = {row.get("seed"): row for row in n.get("per_seed") or []}
    for i, row in enumerate(r.get("per_seed") or []):
        other = rerun_seeds.get(row.get("seed"), {})
        figures.append(Figure(f"results.per_seed[{i}].top1", row.get("top1"), other.get("top1")))
    for key in ("top5", "top5_fp32"):
        figures.append(Figure(f"results.{key}", r.get(key), n.get(key), judged=False))
    return figures


def image_changes(card: Dict[str, Any], rerun: Dict[str, Any]) -> List[ImageChange]:
    """Per set of outcomes (FP32, then each of the card's seeds): which images changed outcome between the
    card and the rerun. Empty when the card has no outcomes (nothing to compare image by image)."""
    mine, theirs = card["results"].get("outcomes"), rerun["results"].get("outcomes")
    if not mine:
        return []
    if not theirs:
        return [ImageChange("outcomes", problem="the rerun recorded no per-sample outcomes")]
    n = mine.get("n")
    if theirs.get("n") != n:
        return [ImageChange("outcomes", problem=f"the card's outcomes cover {n} images, the rerun's "
                                                f"{theirs.get('n')}: not the same eval images")]
    pairs = [("FP32", mine.get("fp32"), theirs.get("fp32"))]
    pairs += [(f"seed {s}", bits, (theirs.get("seeds") or {}).get(s)) for s, bits in (mine.get("seeds") or {}).items()]
    out = []
    for label, a, b in pairs:
        change = ImageChange(label, n=n)
        if a is None or b is None:
            change.problem = f"no {label} outcomes " + ("on the card" if a is None else "in the rerun")
        else:
            try:
                change.lost, change.gained = discordant_counts(unpack_outcomes(a, n), unpack_outcomes(b, n))
            except QcardError as exc:
                change.problem = f"the {label} outcomes do not decode: {exc}"
        out.append(change)
    return out


def differences(card: Any, rerun: Any, where: str) -> Iterator[str]:
    """'path: card X, rerun Y' wherever two JSON values differ (exactly: cost and quantization do not
    depend on the CPU's last bits)."""
    if isinstance(card, dict) and isinstance(rerun, dict):
        # a key only the rerun has was added to qcard after the card was written: no number moved
        for k in sorted(card, key=str):
            yield from differences(card[k], rerun.get(k), f"{where}.{k}")
    elif isinstance(card, list) and isinstance(rerun, list) and len(card) == len(rerun):
        for i, (a, b) in enumerate(zip(card, rerun)):
            yield from differences(a, b, f"{where}[{i}]")
    elif card != rerun:
        yield f"{where}: card {_short(card)}, rerun {_short(rerun)}"


def cost_differences(card: Dict[str, Any], rerun: Dict[str, Any]) -> List[str]:
    """The cost totals of the main profile and of every further profile (per-layer rows add up to them)."""
    totals = lambda block: {k: v for k, v in (block or {}).items() if k != "layers"}
    out = list(differences(totals(card.get("cost")), totals(rerun.get("cost")), "cost"))
    profiles = sorted(set(card.get("cost_profiles") or {}) | set(rerun.get("cost_profiles") or {}))
    for name in profiles:
        out += differences(totals((card.get("cost_profiles") or {}).get(name)),
                           totals((rerun.get("cost_profiles") or {}).get(name)), f"cost_profiles.{name}")
    return out


def environment_differences(card_prov: Dict[str, Any], here: Dict[str, Any]):
    """([(in words, card's, here)] that differ, [(in words, value)] that match). Uncommitted changes on
    either side count as a difference: the code that ran is then not known from its commit."""
    differ, same = [], []
    for key, words in ENVIRONMENT:
        a, b = card_prov.get(key), here.get(key)
        if key == "git_dirty" and (a or b):
            differ.append((words, a, b))
        elif a != b:
            differ.append((words, a, b))
        else:
            same.append((words, a))
    return differ, same


def input_differences(card: Dict[str, Any], rerun: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    out = []
    for path, words in INPUTS:
        block, key = path.split(".")
        a, b = (card.get(block) or {}).get(key), (rerun.get(block) or {}).get(key)
        if a != b:
            out.append((words, a, b))
    return out


def compare_card(verdict: CardVerdict, rerun: Dict[str, Any]) -> None:
    """Fill a verdict from the card and its rerun (both as JSON dicts)."""
    card = verdict.card.model_dump(mode="json")
    differ, same = environment_differences(card["provenance"], rerun.get("provenance") or {})
    verdict.environment, verdict.same = differ + input_differences(card, rerun), same
    if rerun.get("status") != "ok":
        error = str(rerun.get("error"))
        if input_missing(error):
            verdict.unverifiable = f"the rerun could not find an input: {error}: {_fix(verdict.card)}"
        else:
            verdict.problem = f"the rerun failed: {error}"
        return
    verdict.images = image_changes(card, rerun)
    verdict.figures = accuracy_figures(card, rerun)
    verdict.cost = cost_differences(card, rerun)
    verdict.quantization = list(differences(card.get("quantization"), rerun.get("quantization"), "quantization"))


# ------------------------------------------------------------------ running


def load_verifiable(paths: Sequence[Union[str, Path]]) -> List[Tuple[Path, Card]]:
    """Every card under paths, checked before anything runs: a card that cannot be rerun from itself at all
    (not a card, a failed card, a card written before cards carried their point) is the user's error, and
    so is a card whose inputs are missing here ("could not verify", with the fix). A card that disagrees
    with its own outcomes loads: that is a verdict (NOT VERIFIED), not a usage error."""
    cards, problems = [], []
    for path in find_card_files(paths):
        card = load_card(path, check_evidence=False)
        if card.status != "ok":
            problems.append(f"{path} is a failed card (status: failed: {card.error}): there is no result to "
                            "verify; fix the cause and rerun it with `qcard run`")
        elif not card.point or not isinstance(card.point.get("config"), dict):
            problems.append(f"{path} was written by an older qcard (no `point` block): it cannot be rerun from "
                            f"the card alone; rerun its config instead: {card.reproduce}")
        else:
            missing = missing_inputs(card)
            if missing:
                problems.append(f"could not verify {path}: {missing[0]}")
            else:
                cards.append((path, card))
    if problems:
        more = f" (and {len(problems) - 1} more card(s) that cannot be verified)" if len(problems) > 1 else ""
        raise QcardError(problems[0] + more)
    return cards


_WEIGHT_WORDS = ("random", "bundled")      # weights: values that are not file paths (config.py's)


def missing_inputs(card: Card) -> List[str]:
    """What the card's point config needs that is not here, each with its fix: a weights file, image folder,
    dataset root or cost profile file not at its path; user code (a `python:` model, a `pkg.module:Class`
    method) that does not import because its folder is not on PYTHONPATH (the card's reproduce line names
    the PYTHONPATH it was made with)."""
    cfg = card.point.get("config") or {}
    here = os.getcwd()
    files: List[Tuple[str, str, bool]] = []      # (key path, path, a folder?)
    code: List[Tuple[str, str]] = []             # (key path, module)
    for i, m in enumerate(cfg.get("models") or []):
        if not isinstance(m, dict):
            continue
        weights, ref = m.get("weights"), str(m.get("ref") or "")
        if isinstance(weights, str) and weights not in _WEIGHT_WORDS:
            files.append((f"models[{i}].weights", weights, False))
        if ref.startswith("python:"):
            code.append((f"models[{i}].ref", ref[len("python:"):].partition(":")[0]))
    ds = cfg.get("dataset") or {}
    ref = str(ds.get("ref") or "")
    if ref.startswith("imagefolder:"):
        files.append(("dataset.ref", ref[len("imagefolder:"):], True))
    if isinstance(ds.get("root"), str) and not ds.get("download"):
        files.append(("dataset.root", ds["root"], True))
    for i, m in enumerate(cfg.get("methods") or []):
        name = m.get("name") if isinstance(m, dict) else m
        if isinstance(name, str) and ":" in name:
            code.append((f"methods[{i}].name", name.partition(":")[0]))
    for i, prof in enumerate((cfg.get("cost") or {}).get("profiles") or []):
        head = str(prof).rpartition(":")[0] if "=" in str(prof).rpartition(":")[2] else str(prof)
        if head.endswith((".yaml", ".yml")) or "/" in head or os.sep in head:
            files.append((f"cost.profiles[{i}]", head, False))

    out = []
    for where, path, folder in files:
        p = Path(os.path.expanduser(path))
        if (p.is_dir() if folder else p.is_file()):
            continue
        what = "folder" if folder else "file"
        if p.is_absolute():
            out.append(f"point.config.{where}: {what} {path} not found on this machine: put it there (or run "
                       f"qcard verify where it is)")
        else:
            out.append(f"point.config.{where}: {what} {path} not found from {here} (a relative path in the card's "
                       f"point config resolves against the folder qcard verify runs in): run qcard verify from "
                       f"the folder the card was made in")
    pythonpath = _reproduce_pythonpath(card.reproduce)
    for where, module in code:
        if _importable(module):
            continue
        if pythonpath:
            out.append(f"point.config.{where}: module '{module}' is not importable here; the card was made with "
                       f"PYTHONPATH={pythonpath} (its reproduce line): run `PYTHONPATH={shlex.quote(pythonpath)} "
                       f"qcard verify ...`")
        else:
            out.append(f"point.config.{where}: module '{module}' is not importable here: put the folder that "
                       f"holds it on PYTHONPATH (or install it) and run qcard verify again")
    return out


# what an error says when a file or module the point needs is not here (config.py, registry.py, loaders)
_MISSING = re.compile(r"not found|No such file or directory|ModuleNotFoundError|No module named|cannot import module")


def input_missing(error: str) -> bool:
    """Whether a load or run error says that an input of the point (a file, a folder, user code) is missing."""
    return bool(_MISSING.search(error or ""))


def _fix(card: Card) -> str:
    pythonpath = _reproduce_pythonpath(card.reproduce)
    return ("run qcard verify from the folder the card was made in"
            + (f", with PYTHONPATH={shlex.quote(pythonpath)} (the card's reproduce line)" if pythonpath else "")
            + ", or make the input available at the path its point config names")


def _reproduce_pythonpath(reproduce: str) -> Optional[str]:
    """The PYTHONPATH=... a card's reproduce line starts with (runner.reproduce_command writes it), or None."""
    m = re.match(r"\s*PYTHONPATH=(\S+)\s", reproduce or "")
    if not m:
        return None
    try:
        return shlex.split(m.group(1))[0]
    except (ValueError, IndexError):
        return m.group(1)


def _importable(module: str) -> bool:
    """Whether the module can be found (imports its parent packages, as running the point would)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
    except Exception:        # the module is there but fails to import: the rerun reports that, as a failure
        return True


def point_of(card: Card, path: Path):
    """(Experiment, None) of the card's own point config, or (None, why it cannot be rerun as this card)."""
    try:
        exp = config_from_dict(card.point["config"], source=f"{path}: point.config")
    except QcardError as exc:
        return None, f"the card's point config does not load with this qcard: {exc}"
    points = exp.points()
    if len(points) != 1:
        return None, f"the card's point config gives {len(points)} points, not one"
    if points[0].id != card.id:
        return None, (f"the card's point config no longer gives the same point with this qcard (id "
                      f"{points[0].id[:10]}, the card's {card.id[:10]}): it was changed, or point ids are "
                      "computed differently since the card was written; nothing was rerun")
    return exp, None


@contextlib.contextmanager
def torch_threads(n: Optional[int]):
    """Run with the card's intra-op thread count (CPU reductions depend on it); restored after."""
    if not n:
        yield
        return
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def verify_cards(paths: Sequence[Union[str, Path]], *, keep: Optional[Union[str, Path]] = None,
                 log: Callable[[str], None] = print,
                 report: Callable[[CardVerdict], None] = lambda v: None) -> List[CardVerdict]:
    """Rerun every card under paths and judge it; report(verdict) is called as each card is done.
    Reruns go to a temporary folder (removed after) or to keep; they share one FP32 baseline cache there."""
    from .runner import run
    cards = load_verifiable(paths)
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="qcard-verify-"))
    reruns: Dict[str, Dict[str, Any]] = {}     # the same point at the same thread count runs once
    verdicts = []
    try:
        for path, card in cards:
            verdict = CardVerdict(path, card)
            exp, verdict.problem = point_of(card, path)
            if verdict.problem and input_missing(verdict.problem):
                verdict.unverifiable, verdict.problem = f"{verdict.problem}: {_fix(card)}", None
            if exp is not None:
                threads = card.provenance.torch_threads
                key = canonical_hash({"id": card.id, "threads": threads})
                if key not in reruns:
                    log(f"qcard verify: rerunning {path} ({card.id[:10]}"
                        + (f", {threads} torch threads" if threads else "") + ")")
                    with torch_threads(threads):
                        summary = run(exp, out=str(root), force=True, progress=False, log=lambda m: None)
                    reruns[key] = summary.outcomes[0].card or {}
                    if keep:
                        verdict.rerun_folder = summary.outcomes[0].folder
                compare_card(verdict, reruns[key])
            verdicts.append(verdict)
            report(verdict)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return verdicts


# ------------------------------------------------------------------ the report


def _num(x: Any) -> str:
    if x is None:
        return "missing"
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _env(words: str, value: Any) -> str:
    if value is None:
        return "unknown"
    if words == "git commit":
        return str(value)[:12]
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _p(p: float) -> str:
    """A p-value to two significant digits."""
    return f"{p:.2f}" if p >= 0.1 else f"{p:.2g}"


def image_line(v: CardVerdict, c: ImageChange) -> str:
    mark = "ok  " if v.image_ok(c) else "FAIL"
    if c.problem:
        return f"  {mark} outcomes, {c.label}: {c.problem}"
    if c.changed == 0:
        return f"  {mark} outcomes, {c.label}: all {c.n:,} eval images the same"
    moved = (f"{c.changed:,} of {c.n:,} eval images changed outcome ({c.lost:,} right on the card and wrong in "
             f"the rerun, {c.gained:,} the reverse); exact McNemar p = {_p(c.p)}")
    if not v.explained:
        return f"  {mark} outcomes, {c.label}: {moved}: nothing in the environment differs, so none may change"
    level = f"{'significant' if c.significant else 'not significant'} at {ALPHA:g}"
    return f"  {mark} outcomes, {c.label}: {moved}: {level}" + (
        ": the rerun scores differently" if c.significant else " (the environment differs)")


def format_verdict(v: CardVerdict) -> str:
    c = v.card
    lines = [f"{v.path}: {c.model.label or c.model.ref} · {c.method.label or c.method.name} ({c.id[:10]}): "
             + v.state]
    if v.unverifiable:
        return "\n".join(lines + [f"  could not verify: {v.unverifiable}"])
    if v.problem:
        lines.append(f"  {v.problem}")
    if not v.evidence.ok:
        lines.append(f"  FAIL the card disagrees with its own per-sample outcomes ({len(v.evidence.mismatches)} "
                     f"field(s)):")
        lines += [f"       {m.line('card')[len('card: '):]}" for m in v.evidence.mismatches]
    elif v.evidence.checked:
        lines.append("  ok   the card's figures agree with its own per-sample outcomes")
    else:
        lines.append(f"  note {NO_EVIDENCE} (no image-by-image comparison: top-1 figures must be identical)")
    lines += [f"  note {w}" for w in v.evidence.warnings]
    lines += [image_line(v, ch) for ch in v.images]
    for f in v.figures:
        if f.judged or not f.identical:
            mark = "FAIL" if not v.figure_ok(f) else "ok  " if f.judged or f.identical else "note"
            lines.append(f"  {mark} {f.field}: card {_num(f.card)}, rerun {_num(f.rerun)}: {f.verdict()}")
    if not v.problem:
        lines += _block_lines("cost totals", v.cost) + _block_lines("quantization block", v.quantization)
    if v.environment:
        lines.append("  differences that could explain a difference (card -> this machine):")
        lines += [f"    {words}: {_env(words, a)} -> {_env(words, b)}" for words, a, b in v.environment]
    elif not v.problem:
        lines.append("  nothing in the environment differs: the same config must give the same outcomes")
    if v.same:
        lines.append("  same: " + ", ".join(f"{words} {_env(words, val)}" for words, val in v.same))
    if v.rerun_folder:
        lines.append(f"  rerun kept in {v.rerun_folder}")
    return "\n".join(lines)


def _block_lines(name: str, diffs: List[str]) -> List[str]:
    if not diffs:
        return [f"  ok   {name}: identical"]
    return [f"  FAIL {name}: {len(diffs)} field(s) differ"] + [f"       {d}" for d in diffs[:20]] + (
        [f"       ... and {len(diffs) - 20} more"] if len(diffs) > 20 else [])
