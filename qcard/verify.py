"""`qcard verify`: rerun each card's point from the card alone and say whether its numbers hold.

The card carries a config of its point alone (`card.point["config"]`, from `Point.as_config`); it is loaded
with `config_from_dict`, must give one point with the card's id, and runs through the runner's Python API
into a temporary folder, with the card's torch thread count. Then, per card:

- top-1 figures (the headline accuracy, FP32, Δ, each seed): identical; else within the card's 95 %
  interval for that figure, when the card has one and the card's own value lies inside it; else outside.
- cost totals (every profile) and the quantization block: identical, or the fields that differ are named.
- the environment (software, CPU, threads, code) of the card and of this machine, and what differs.

The rule (one place: `CardVerdict.ok`): on the same environment the same config gives the same numbers, so
any difference fails; where something in the environment differs (another CPU, torch, thread count, code),
a top-1 figure may move within its interval. Cost and quantization must always be identical: they do not
depend on the CPU's last bits. Top-5 figures have no interval: a difference is shown, and judged like a
top-1 figure without an interval only on the same environment.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .cards.compare import find_card_files
from .cards.schema import Card, load_card
from .config import canonical_hash, config_from_dict
from .errors import QcardError

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
    interval: Optional[Tuple[float, float]] = None
    judged: bool = True                   # False: shown, but a difference is only a note (top-5)

    @property
    def identical(self) -> bool:
        return self.card == self.rerun

    @property
    def within(self) -> bool:
        """Both the card's value and the rerun's lie in the card's interval."""
        if self.interval is None or self.card is None or self.rerun is None:
            return False
        lo, hi = self.interval
        return lo <= self.card <= hi and lo <= self.rerun <= hi

    def verdict(self) -> str:
        if self.identical:
            return "identical"
        if not self.judged:
            return "differs (no interval for it: shown, judged only on the same environment)"
        if self.within:
            return f"within the card's 95 % interval [{_num(self.interval[0])}, {_num(self.interval[1])}]"
        if self.interval is None:
            return "differs; the card has no interval for it"
        lo, hi = self.interval
        if self.card is not None and not lo <= self.card <= hi:
            return f"differs; the card's own value lies outside its interval [{_num(lo)}, {_num(hi)}]"
        return f"outside the card's 95 % interval [{_num(lo)}, {_num(hi)}]"


@dataclass
class CardVerdict:
    path: Path
    card: Card
    problem: Optional[str] = None         # the point could not be rerun as itself (or the rerun failed)
    figures: List[Figure] = field(default_factory=list)
    cost: List[str] = field(default_factory=list)           # "field: card X, rerun Y"
    quantization: List[str] = field(default_factory=list)
    environment: List[Tuple[str, Any, Any]] = field(default_factory=list)   # (in words, card's, this machine's)
    same: List[Tuple[str, Any]] = field(default_factory=list)               # (in words, value) that match
    rerun_folder: Optional[Path] = None

    @property
    def explained(self) -> bool:
        """Something differs between the card's environment and this one that could move the last bits."""
        return bool(self.environment)

    def figure_ok(self, f: Figure) -> bool:
        if f.identical:
            return True
        if not f.judged:
            return self.explained
        return self.explained and f.within

    @property
    def ok(self) -> bool:
        return (self.problem is None and not self.cost and not self.quantization
                and all(self.figure_ok(f) for f in self.figures))


# ------------------------------------------------------------------ comparing


def accuracy_figures(card: Dict[str, Any], rerun: Dict[str, Any]) -> List[Figure]:
    """The card's accuracy figures beside the rerun's, each with the card's interval for it when it has one."""
    r, n = card["results"], rerun["results"]
    figures = [Figure("results.quantized", r.get("quantized"), n.get("quantized"), _interval(r.get("ci95"))),
               Figure("results.fp32", r.get("fp32"), n.get("fp32"), _interval(r.get("fp32_ci95"))),
               Figure("results.delta", r.get("delta"), n.get("delta"), _interval(r.get("delta_ci95")))]
    rerun_seeds = {row.get("seed"): row for row in n.get("per_seed") or []}
    one_seed = len(r.get("per_seed") or []) == 1
    for i, row in enumerate(r.get("per_seed") or []):
        other = rerun_seeds.get(row.get("seed"), {})
        # a seed's own interval when the card has one; with one seed its top-1 is the headline figure
        interval = _interval(row.get("ci95")) or (_interval(r.get("ci95")) if one_seed else None)
        figures.append(Figure(f"results.per_seed[{i}].top1", row.get("top1"), other.get("top1"), interval))
    for key in ("top5", "top5_fp32"):
        figures.append(Figure(f"results.{key}", r.get(key), n.get(key), judged=False))
    return figures


def _interval(value: Any) -> Optional[Tuple[float, float]]:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return float(value[0]), float(value[1])
    return None


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
        verdict.problem = f"the rerun failed: {rerun.get('error')}"
        return
    verdict.figures = accuracy_figures(card, rerun)
    verdict.cost = cost_differences(card, rerun)
    verdict.quantization = list(differences(card.get("quantization"), rerun.get("quantization"), "quantization"))


# ------------------------------------------------------------------ running


def load_verifiable(paths: Sequence[Union[str, Path]]) -> List[Tuple[Path, Card]]:
    """Every card under paths, checked before anything runs: a card that cannot be rerun from itself at all
    (not a card, a failed card, a card written before cards carried their point) is the user's error."""
    cards, problems = [], []
    for path in find_card_files(paths):
        card = load_card(path)
        if card.status != "ok":
            problems.append(f"{path} is a failed card (status: failed: {card.error}): there is no result to "
                            "verify; fix the cause and rerun it with `qcard run`")
        elif not card.point or not isinstance(card.point.get("config"), dict):
            problems.append(f"{path} was written by an older qcard (no `point` block): it cannot be rerun from "
                            f"the card alone; rerun its config instead: {card.reproduce}")
        else:
            cards.append((path, card))
    if problems:
        more = f" (and {len(problems) - 1} more card(s) that cannot be verified)" if len(problems) > 1 else ""
        raise QcardError(problems[0] + more)
    return cards


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


def format_verdict(v: CardVerdict) -> str:
    c = v.card
    lines = [f"{v.path}: {c.model.label or c.model.ref} · {c.method.label or c.method.name} ({c.id[:10]}): "
             + ("VERIFIED" if v.ok else "NOT VERIFIED")]
    if v.problem:
        lines.append(f"  {v.problem}")
    for f in v.figures:
        if f.judged or not f.identical:
            mark = "FAIL" if not v.figure_ok(f) else "ok  " if f.judged or f.identical else "note"
            lines.append(f"  {mark} {f.field}: card {_num(f.card)}, rerun {_num(f.rerun)}: {f.verdict()}")
    if v.figures and not v.explained and any(not f.identical for f in v.figures):
        lines.append("       nothing in the environment differs: the same config should give the same numbers")
    if not v.problem:
        lines += _block_lines("cost totals", v.cost) + _block_lines("quantization block", v.quantization)
    if v.environment:
        lines.append("  differences that could explain a difference (card -> this machine):")
        lines += [f"    {words}: {_env(words, a)} -> {_env(words, b)}" for words, a, b in v.environment]
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
