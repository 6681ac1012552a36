"""`qcard export CARD.json|POINT_DIR --format onnx -o model.onnx`: the card's quantized model as ONNX QDQ;
`--format hf -o DIR`: a model release for the Hugging Face Hub (DIR/model.onnx, DIR/card.json, DIR/README.md).

A card that already says its model cannot run as integer (qcard.deploy.check.card_problem) is refused
at once. Otherwise the card's point config (card.point.config, schema 2) is rerun for its last seed, as the runner ran it,
and the simulated model is written with exactly its scales and zero points (qcard.deploy.export_onnx).
The ONNX file carries the card's metadata (qcard.deploy.metadata: card id, versions, recipe, preprocessing,
class names). torch is imported inside the command only (this module is imported by `qcard --help`).
"""
from __future__ import annotations

import os
import shutil
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
    from ..quant.int_bias import round_biases
    round_biases(result.model)              # as the runner does: the bias integer runtimes add
    return result.model, evaluation, type(method).name or point.method


def hf_readme(card, front: dict, info, model_file: str) -> str:
    """The Hugging Face model card (README.md): YAML front matter (qcard.deploy.metadata.hf_front_matter),
    then what the files are, how to feed the model, and the quantization card itself (its Markdown)."""
    import yaml
    from ..cards.render import md_cell, md_code, render_card
    from ..deploy.metadata import preprocessing, top1_text
    data = card.model_dump(mode="json")
    pre = preprocessing(data)
    name = front["model-index"][0]["name"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True, width=100).rstrip(), "---", "",
             f"# {md_cell(name)}, quantized with qcard", "",
             f"{md_cell(top1_text(data))}.", "",
             "## Files", "",
             f"- {md_code(model_file)}: ONNX QDQ graph (opset {info.opset}) with qcard's own scales and zero points; "
             f"{info.weight_dq} integer weight(s), {info.activation_qdq} activation quantize/dequantize pair(s). "
             "Its `metadata_props` carry the card id, the recipe, the preprocessing (and the class names when the "
             "dataset names them) "
             "(`onnxruntime.InferenceSession(path).get_modelmeta().custom_metadata_map`).",
             "- `card.json`: the quantization card; every figure here is derived from it, and "
             "`qcard verify card.json` reruns it.", "",
             "## Input", "",
             "| | |", "|---|---|"]
    for key, value in pre.items():
        lines.append(f"| {md_cell(key)} | {md_code(value)} |")
    lines += ["", "```python", "import numpy as np, onnxruntime as ort",
              f"session = ort.InferenceSession({model_file!r})",
              f"x = np.zeros((1, {', '.join(str(v) for v in pre.get('input_shape', []))}), np.float32)  "
              "# an image, scaled and normalized as above",
              "logits = session.run(None, {session.get_inputs()[0].name: x})[0]", "```", ""]
    body = render_card(card, "md")
    body = body.replace("# Quantization card", "## Quantization card", 1)    # one title per page
    return "\n".join(lines) + "\n" + body


@click.command("export")
@click.argument("target", metavar="CARD.json|POINT_DIR")
@click.option("--format", "fmt", type=click.Choice(["onnx", "hf"]), default="onnx", show_default=True,
              help="onnx: an ONNX QDQ graph with the card's scales and zero points; hf: a folder for the Hugging "
                   "Face Hub with that graph (model.onnx), card.json and a model card (README.md)")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="the file to write (onnx), or the folder (hf: new or empty)")
@click.option("--opset", type=click.IntRange(13, 23), default=None,
              help="ONNX opset (default: 13; 21 when the card's deploy block asks for int4_weights)")
@user_errors
def export(target: str, fmt: str, output: str, opset) -> None:
    """Write the quantized model of a card as ONNX QDQ (reruns the card's point for its last seed), with the
    card's id, recipe and preprocessing in the file's metadata; `--format hf` writes a model release folder.

    \b
    Examples:
      qcard export runs/quickstart/resnet8__W8A8__fa9cafc6c5 -o resnet8_w8a8.onnx
      qcard export runs/quickstart/resnet8__W8A8__fa9cafc6c5 --format hf -o release/
    """
    from ..deploy import NotDeployable, export_onnx, require_runtime
    from ..deploy.metadata import card_metadata, class_names_of, hf_front_matter, recipe_summary, write_metadata
    from ..provenance import git_state
    from ..version import __version__
    from ..deploy.check import card_problem
    from ..cards.schema import load_card
    card_path = _card_path(target)
    folder = Path(output)
    if fmt == "hf" and (folder.is_file() or (folder.is_dir() and any(folder.iterdir()))):
        raise QcardError(f"{output}: --format hf writes a folder (model.onnx, card.json, README.md): give a new "
                         "or empty folder")
    if fmt == "onnx" and folder.is_dir():
        raise QcardError(f"{output}: is a folder; --format onnx writes one file (e.g. -o model.onnx)")
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
    onnx_path = folder / "model.onnx" if fmt == "hf" else folder
    if fmt == "hf":
        folder.mkdir(parents=True, exist_ok=True)
    try:
        info = export_onnx(sim, example, onnx_path, opset=opset, method=method,
                           int4=bool(point.deploy and point.deploy.int4_weights))
    except NotDeployable as exc:
        if fmt == "hf" and not any(folder.iterdir()):
            folder.rmdir()
        raise QcardError(f"{card_path}: not deployable on onnxruntime: {exc}") from None
    data = card.model_dump(mode="json")
    commit, dirty = git_state()
    write_metadata(onnx_path, card_metadata(data, class_names_of(evaluation),
                                            {"version": __version__, "git_commit": commit, "git_dirty": dirty}),
                   doc_string=f"qcard card {card.id}: {recipe_summary(data)}")
    if fmt == "hf":
        from ..methods import with_sections
        shutil.copyfile(card_path, folder / "card.json")
        readme = hf_readme(with_sections(card), hf_front_matter(data, "model.onnx"), info, "model.onnx")
        tmp = folder / "README.md.tmp"
        tmp.write_text(readme, encoding="utf-8")
        os.replace(tmp, folder / "README.md")
    types = ", ".join(f"{k} ×{v}" for k, v in sorted(info.weight_types.items())) or "none"
    click.echo(f"wrote {onnx_path}: ONNX QDQ, opset {info.opset}, {info.activation_qdq} activation Q/DQ pair(s), "
               f"{info.weight_dq} integer weight(s) ({types}); metadata: card {card.id[:10]}, recipe, preprocessing")
    if fmt == "hf":
        click.echo(f"wrote {folder / 'README.md'} (Hugging Face model card) and {folder / 'card.json'}")
    for note in info.notes:
        click.echo(f"note: {note}")
