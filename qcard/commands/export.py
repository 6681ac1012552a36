"""`qcard export CARD.json|POINT_DIR --format onnx -o model.onnx`: the card's quantized model as ONNX QDQ.

A card that already says its model cannot run as integer (qcard.deploy.check.card_problem) is refused
at once. Otherwise the card's point config (card.point.config, schema 2) is rerun for its last seed, as the runner ran it,
and the simulated model is written with exactly its scales and zero points (qcard.deploy.export_onnx).
torch is imported inside the command only (this module is imported by `qcard --help`).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import click

from . import user_errors
from ..errors import QcardError


def _card_path(target: str) -> Path:
    p = Path(target)
    if p.is_dir():
        p = p / "card.json"
    if not p.is_file():
        raise QcardError(f"{target}: no card here; give a card.json or the point folder that holds one "
                         "(runs/EXPERIMENT/POINT/)")
    return p


def _point_of(card_path: Path):
    from ..cards.schema import load_card
    from ..config import config_from_dict
    card = load_card(card_path)
    cfg = (card.point or {}).get("config")
    if not cfg:
        raise QcardError(f"{card_path}: this card has no point config (written before card schema 2); rerun the "
                         "point with this qcard, then export its card")
    if card.status != "ok":
        raise QcardError(f"{card_path}: the point failed ({card.error}); there is no quantized model to export")
    exp = config_from_dict(cfg, source=f"{card_path}: point.config")
    return exp, exp.points()[0], card


def rebuild_simulated(exp, point, log):
    """(the simulated model of the point's last seed, its eval dataset), rebuilt as the runner builds it."""
    import copy
    from ..methods import resolve_method
    from ..methods.base import PointData, RunContext
    from ..runner import Resources, set_seed
    from ..store import RunStore
    device = "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        res = Resources(exp, RunStore(Path(tmp)), device, log)
        base, info = res.model(point)
        train, evaluation = res.datasets(point, info)
    cal = point.dataset.calibration
    data = PointData(train=train, eval=evaluation, num_classes=train.num_classes, input_shape=tuple(train.input_shape),
                     batch_size=point.dataset.batch_size, num_workers=point.dataset.num_workers,
                     calibration_size=cal.size, calibration_seed=cal.seed, fingerprint=evaluation.fingerprint)
    seed = point.seeds[-1]
    set_seed(seed, point.deterministic)
    ctx = RunContext(seed=seed, device=device, progress=False, log=lambda m: log(f"  {m}"))
    method = resolve_method(point.method)()
    result = method.apply(copy.deepcopy(base), data, point.params, ctx)
    return result.model, evaluation, type(method).name or point.method


@click.command("export")
@click.argument("target", metavar="CARD.json|POINT_DIR")
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True,
              help="onnx: an ONNX QDQ graph with the card's scales and zero points")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="the file to write")
@click.option("--opset", type=click.IntRange(13, 23), default=None,
              help="ONNX opset (default: 13; 21 when the card's deploy block asks for int4_weights)")
@user_errors
def export(target: str, fmt: str, output: str, opset) -> None:
    """Write the quantized model of a card as ONNX QDQ (reruns the card's point for its last seed)."""
    from ..deploy import NotDeployable, export_onnx, require_runtime
    from ..deploy.check import card_problem
    from ..cards.schema import load_card
    card_path = _card_path(target)
    card = load_card(card_path)
    problem = card_problem(card.model_dump(mode="json")) if card.status == "ok" else None
    if problem:          # what the card already says: refused before any rerun (a QAT point retrains)
        raise QcardError(f"{card_path}: not deployable on onnxruntime: {problem} (as the card says; nothing "
                         "was rerun)")
    require_runtime()
    exp, point, card = _point_of(card_path)
    if point.id != card.id:
        click.echo(f"warning: the card's point config gives point id {point.id[:10]}, the card says {card.id[:10]} "
                   "(written by another qcard version?); exporting the config's point", err=True)
    click.echo(f"qcard export: rerunning {point.method_label} on {point.model.short} (seed {point.seeds[-1]})", err=True)
    sim, evaluation, method = rebuild_simulated(exp, point, lambda m: click.echo(m, err=True))
    example = evaluation[0][0].unsqueeze(0).float()
    try:
        info = export_onnx(sim, example, output, opset=opset, method=method,
                           int4=bool(point.deploy and point.deploy.int4_weights))
    except NotDeployable as exc:
        raise QcardError(f"{card_path}: not deployable on onnxruntime: {exc}") from None
    types = ", ".join(f"{k} ×{v}" for k, v in sorted(info.weight_types.items())) or "none"
    click.echo(f"wrote {output}: ONNX QDQ, opset {info.opset}, {info.activation_qdq} activation Q/DQ pair(s), "
               f"{info.weight_dq} integer weight(s) ({types})")
    for note in info.notes:
        click.echo(f"note: {note}")
