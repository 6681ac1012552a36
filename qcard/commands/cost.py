"""`qcard cost MODEL`: the simulated hardware cost of a model at uniform bit widths, no data needed.

torch is imported inside the command only (this module is imported by `qcard --help`).
"""
from __future__ import annotations

import gc
import json
import math
from typing import Any, Dict, List, Optional, Tuple

import click

from . import user_errors
from ..errors import QcardError

DEFAULT_SHAPE = (3, 224, 224)


def _parse_shape(text: Optional[str]) -> Optional[Tuple[int, ...]]:
    if text is None:
        return None
    parts = [p.strip() for p in text.strip().replace("x", ",").split(",")]
    shape = tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else ()
    if not shape or any(s <= 0 for s in shape):
        raise QcardError(f"--input-shape must be positive integers such as 3,224,224, got '{text}'")
    return shape


def _bits(value: Optional[float], option: str) -> Optional[float]:
    if value is None:
        return None
    if not (1 <= value <= 32):
        raise QcardError(f"{option} must be between 1 and 32 bits (omit it for FP32), got {value:g}")
    return int(value) if float(value).is_integer() else float(value)


def _build(model_ref: str):
    """The model, its info, and the device to trace on. Built on the meta device when possible:
    shapes are all the cost model needs, and it skips random initialisation (seconds for big models)."""
    import torch
    from ..zoo import load_model_with_info
    # weight values do not change the cost (shapes do), so no weights are loaded
    try:
        with torch.device("meta"):
            model, info = load_model_with_info(model_ref, weights="random")
        if all(p.is_meta for p in model.parameters()):
            return model, info, "meta"
    except Exception:
        pass        # e.g. a model that needs real tensors to build: build it normally (a bad
                    # reference then raises its own error from the normal build)
    model, info = load_model_with_info(model_ref, weights="random")
    return model, info, "cpu"


def _trace(model, shape, device):
    from ..cost.trace import trace_model
    if device == "meta":
        try:
            return trace_model(model, shape, device="meta")
        except QcardError:
            pass    # data-dependent control flow needs real values: the caller rebuilds on CPU
        return None
    return trace_model(model, shape, device=device)


_SHAPE_SOURCES = {
    "timm": "timm's pretrained_cfg input_size (timm.data.resolve_data_config)",
    "torchvision": "the eval crop size of torchvision's default weights for this architecture",
    "qcard": "the qcard zoo's input shape for this model",
    "python": "the model's input_shape attribute",
}


def _input_shape(shape_arg, info) -> Tuple[Tuple[int, ...], str]:
    """(the shape to trace at, where it came from): the flag, else the model's own default."""
    if shape_arg is not None:
        return shape_arg, "--input-shape"
    if info.input_shape:
        return tuple(info.input_shape), _SHAPE_SOURCES.get(info.source, "the model's default")
    return DEFAULT_SHAPE, f"no model default known: {','.join(map(str, DEFAULT_SHAPE))}"


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not x.is_integer():
        if abs(x) >= 1e4:
            return f"{x:,.0f}"
        return f"{x:.3g}"
    return f"{int(x):,}"


def _table(report: Dict[str, Any]) -> str:
    energy_key = "energy_pj" if report.get("energy_pj") is not None else "energy"
    energy_head = "energy_pj" if energy_key == "energy_pj" else f"energy ({report.get('energy_unit', '-')})"
    cols = [("layer", "name"), ("op", "op"), ("MACs", "macs"), ("params", "params"), ("w", "weight_bits"),
            ("a", "activation_bits"), ("BOPs", "bops")]
    if report.get("latency_cycles") is not None:
        cols.append(("cycles", "cycles"))
    if report.get("energy") is not None:            # only columns the profile models
        cols.append((energy_head, energy_key))
    rows = [[r["name"], r["op"]] + [_fmt(r.get(k)) for _, k in cols[2:]] for r in report["layers"]]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, (h, _) in enumerate(cols)]
    lines = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, ((h, _), w) in enumerate(zip(cols, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def _totals(report: Dict[str, Any]) -> List[str]:
    out = []
    keys = ["params", "params_not_run", "size_bits", "size_bits_with_metadata", "macs", "effective_macs", "bops", "bops_uniq",
            "activation_peak_bits", "largest_activation_map_bits", "memory_traffic_bits", "energy_pj", "energy",
            "energy_ratio_vs_fp32", "energy_ratio_vs_int8", "latency_cycles", "latency_s",
            "speedup_vs_fp32", "speedup_vs_int8"]
    for k in keys:
        if k not in report or (k == "energy" and report.get("energy_pj") is not None):
            continue
        if k == "energy_pj" and report.get("energy") is not None and report.get("energy_pj") is None:
            continue        # energy in a relative unit: printed on the 'energy' line
        v = report[k]
        if v is None:
            out.append(f"  {k:<28} n/a (not modeled by this profile)")
        elif k == "energy":
            out.append(f"  {k:<28} {_fmt(v)} {report.get('energy_unit', '')}")
        elif k == "latency_s" or k.startswith("energy_ratio"):
            out.append(f"  {k:<28} {v:.3g}")
        elif k.startswith("speedup"):
            base = (report.get("speedup_baselines") or {}).get(k.rsplit("_", 1)[-1], {})
            out.append(f"  {k:<28} {v:.3f}x  ({base.get('definition', '')}; baseline: {base.get('baseline', '')})")
        else:
            out.append(f"  {k:<28} {_fmt(v)}")
    if report.get("size_bits") is not None:
        out.append(f"  {'size_MiB':<28} {report['size_bits'] / 8 / 2**20:.3f}")
    for note in report.get("notes") or []:
        out.append(f"  note: {note}")
    return out


@click.command("cost")
@click.argument("model")
@click.option("--w-bits", type=float, default=None, help="weight bits of every conv/linear layer (default: FP32)")
@click.option("--a-bits", type=float, default=None, help="activation bits of every layer's inputs (default: FP32)")
@click.option("--profile", "profiles", multiple=True, metavar="NAME",
              help="hardware profile name or YAML path, repeatable (default: bitops); "
                   "options as NAME:key=value, e.g. systolic-ws:pe_mode=sparq")
@click.option("--input-shape", default=None, metavar="C,H,W",
              help="input shape without the batch (default: the model's own, e.g. timm's pretrained_cfg "
                   "input_size; else 3,224,224); the output says which it took")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of a table")
@user_errors
def cost(model, w_bits, a_bits, profiles, input_shape, as_json):
    """Per-layer and total cost of MODEL (MACs, BOPs, size, traffic, energy, latency, speedups)
    at uniform bit widths, from one traced forward pass. No dataset is needed.

    \b
    Examples:
      qcard cost torchvision:resnet18 --w-bits 8 --a-bits 8
      qcard cost qcard:resnet8 --w-bits 4 --a-bits 4 --profile asic45 --profile systolic-ws
      qcard cost timm:vit_tiny_patch16_224 --profile gpu-t4 --json
      qcard cost torchvision:resnet50 --w-bits 4 --a-bits 8 --profile ./my_chip.yaml
    """
    # Importing torch + torchvision builds a large heap of long-lived objects; the cyclic garbage
    # collector's passes over it cost ~0.4 s of this command's ~2.5 s and free nothing, so
    # collection is paused until the command is done (measured in benchmarks/bench_cost.py).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        reports, info, (shape, shape_source), wb, ab = _run(model, w_bits, a_bits, profiles, input_shape)
    finally:
        if gc_was_enabled:
            gc.enable()

    if as_json:
        first = reports[0]
        out: Dict[str, Any] = {
            "model": info.ref, "input_shape": list(shape), "input_shape_source": shape_source, "w_bits": wb, "a_bits": ab,
            "profile": first["profile"],
            "total": {k: v for k, v in first.items() if k != "layers"},
            "layers": first["layers"],
        }
        if len(reports) > 1:
            out["by_profile"] = {r["profile"]: {"total": {k: v for k, v in r.items() if k != "layers"},
                                                "layers": r["layers"]} for r in reports}
        click.echo(json.dumps(out, allow_nan=False, default=_json_default))
        return

    click.echo(f"model {info.ref}  input {','.join(map(str, shape))} (from {shape_source})  "
               f"weights {wb if wb is not None else 'FP32'}  activations {ab if ab is not None else 'FP32'}")
    for rep in reports:
        click.echo(f"\nprofile {rep['profile']}")
        click.echo(_table(rep))
        click.echo("totals:")
        for line in _totals(rep):
            click.echo(line)


def _run(model: str, w_bits, a_bits, profiles, input_shape):
    from ..cost import apply_bits, estimate, load_profile
    wb, ab = _bits(w_bits, "--w-bits"), _bits(a_bits, "--a-bits")
    shape_arg = _parse_shape(input_shape)
    loaded = [load_profile(p) for p in (profiles or ("bitops",))]    # fail fast on a bad profile

    import torch
    torch.set_num_threads(min(2, torch.get_num_threads()))
    built, info, device = _build(model)
    shape, shape_source = _input_shape(shape_arg, info)
    traced = _trace(built, shape, device)
    if traced is None:                      # meta tracing failed: real tensors on CPU
        from ..zoo import load_model_with_info
        built, info = load_model_with_info(model, weights="random")
        traced = _trace(built, shape, "cpu")
    records = apply_bits(traced.records, wb, ab)
    # params: what ran in the eval pass (the card counts the same); the rest is reported apart
    reports = [estimate(records, prof, total_params=traced.params, not_run=traced.not_run) for prof in loaded]
    return reports, info, (shape, shape_source), wb, ab


def _json_default(o: Any) -> Any:
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


if __name__ == "__main__":      # python -m qcard.commands.cost ... (without the qcard entry point)
    cost()


def profile_lines() -> List[str]:
    """`qcard profiles`: each shipped profile with what it models, one line each (from its YAML)."""
    from ..cost.profile import list_profiles, profile_summary
    names = list_profiles()
    width = max(len(n) for n in names)
    return [f"{n:<{width}}  {profile_summary(n)}" for n in names] + [
        "A profile of your own is the path of a YAML file (qcard cost MODEL --profile my_chip.yaml)."]
