"""The deploy check of one point: export, run on onnxruntime beside the simulation, time both graphs.

Returns the card's `deployment` block (qcard.cards.schema.Deployment) as a dict.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from ..evaluate import top_classes
from .export import NotDeployable, card_problem, export_onnx
from .runtime import (EXECUTION_PROVIDER, SPREAD_SMALL, Timing, integer_macs, latency, make_session, op_counts,
                      require_runtime, run)

__all__ = ["deploy_check", "check_extra", "card_problem", "ARITHMETIC_RATIO"]

# FP32 over int8 operand width: what narrower arithmetic alone can give (the kernels that ran are 8-bit)
ARITHMETIC_RATIO = 32 / 8


def check_extra(wanted: bool) -> None:
    """Raise QcardError (with the install command) when a deploy check is asked for and onnx/onnxruntime
    are missing: called before any point runs."""
    if wanted:
        require_runtime()


def _batches(dataset, batch_size: int):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    for x, y in loader:
        yield x.float(), y


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _compare(sim: nn.Module, session, dataset, batch_size: int) -> Dict[str, Any]:
    """Top-1 of the runtime and of the simulation on the same images, argmax agreement, logit diffs, and
    whether the simulated outputs vary at all (distinct argmax classes; constant logits)."""
    dev = _device(sim)
    hit_rt = hit_sim = agree = total = 0
    diff_max, diff_sum, count = 0.0, 0.0, 0
    classes: Counter = Counter()
    first: Optional[torch.Tensor] = None
    constant, zero = True, True
    sim.eval()
    for x, y in _batches(dataset, batch_size):
        with torch.no_grad():
            ref = sim(x.to(dev)).float().cpu()
        out = torch.from_numpy(run(session, x.numpy()))
        top_rt, top_sim = top_classes(out, 1)[:, 0], top_classes(ref, 1)[:, 0]
        hit_rt += int((top_rt == y).sum())
        hit_sim += int((top_sim == y).sum())
        agree += int((top_rt == top_sim).sum())
        total += len(y)
        classes.update(top_sim.tolist())
        first = ref[0] if first is None else first
        constant = constant and bool((ref == first).all())
        zero = zero and not bool(ref.any())
        d = (out - ref).abs()
        diff_max = max(diff_max, float(d.max()))
        diff_sum += float(d.double().sum())
        count += d.numel()
    return {"eval_size": total, "top1": round(100.0 * hit_rt / total, 4),
            "top1_simulated": round(100.0 * hit_sim / total, 4), "argmax_agreement": round(agree / total, 6),
            "diff_max": diff_max, "diff_mean": diff_sum / max(count, 1),
            "outputs": {"argmax_classes": len(classes), "constant": constant, "zero": zero,
                        "top_class": classes.most_common(1)[0][0] if classes else None}}


def _informative(outputs: Dict[str, Any], n: int) -> Optional[str]:
    """Why agreement on these outputs says nothing (None: it says something)."""
    if outputs["zero"]:
        return (f"not informative: the simulated logits are 0 for all {n} images, so the runtime agreeing "
                "with them (argmax and logit steps) only says its logits are 0 too")
    if outputs["constant"]:
        return (f"not informative: the simulated logits are the same for all {n} images (the model's outputs "
                "do not depend on its input), so agreement compares one output, not the model")
    if outputs["argmax_classes"] <= 1:
        return (f"not informative: the simulated model predicts class {outputs['top_class']} for all {n} "
                "images, so identical argmax only says the runtime does too (use a model whose outputs vary)")
    return None


def _example(dataset, n: int) -> torch.Tensor:
    """n images of the eval set (repeated when it has fewer) as one batch."""
    xs = [dataset[i % len(dataset)][0] for i in range(n)]
    return torch.stack([torch.as_tensor(x) for x in xs]).float()


def deploy_check(sim_model: nn.Module, dataset, *, threads: int = 1, batch_sizes: Sequence[int] = (1, 32),
                 latency_runs: int = 20, latency_budget_s: float = 5.0, opset: Optional[int] = None,
                 int4_weights: bool = False, method: Optional[str] = None,
                 simulated_speedup: Optional[float] = None, eval_batch_size: int = 256,
                 workdir: Optional[str] = None, keep: Optional[str] = None) -> Dict[str, Any]:
    """Export `sim_model` as ONNX QDQ, run it on onnxruntime (CPU, `threads`) over `dataset` (the images the
    simulation was scored on) beside the simulated model, and time it against the same graph in FP32
    (at least `latency_runs` runs per batch size, more while the spread is large, up to `latency_budget_s`).
    `int4_weights`: weights of <= 4 bits as int4 (opset 21) instead of int8 containers.
    `keep`: also copy the QDQ model there. Returns the card's deployment block (status ok | not_deployable |
    failed; a missing runtime raises QcardError)."""
    _, ort = require_runtime()
    block: Dict[str, Any] = {"runtime": "onnxruntime", "runtime_version": ort.__version__,
                             "execution_provider": EXECUTION_PROVIDER, "threads": int(threads),
                             "simulated_speedup": simulated_speedup}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        qdq, fp32, opt = (Path(tmp) / n for n in ("model_qdq.onnx", "model_fp32.onnx", "model_qdq.opt.onnx"))
        example = _example(dataset, 2)
        try:
            info = export_onnx(sim_model, example, qdq, opset=opset, method=method, int4=int4_weights)
            export_onnx(sim_model, example, fp32, opset=info.opset, fp32=True)
        except NotDeployable as exc:
            return {**block, "status": "not_deployable", "reason": str(exc)}
        except Exception as exc:  # noqa: BLE001 - the card says what failed; the simulation's results stand
            return {**block, "status": "failed", "reason": f"export: {type(exc).__name__}: {exc}"[:500]}
        block.update(opset=info.opset, export=info.as_dict(), notes=list(info.notes))
        try:
            session = make_session(qdq, threads, opt)
            block["integer_ops"], block["float_ops"] = op_counts(opt)
            block["integer_macs"] = _macs(qdq, opt, example.numpy())
            cmp = _compare(sim_model, session, dataset, eval_batch_size)
            ref_session = make_session(fp32, threads)
            block["latency"] = [_latency(session, ref_session, dataset, b, latency_runs, latency_budget_s)
                                for b in batch_sizes]
        except Exception as exc:  # noqa: BLE001
            return {**block, "status": "failed", "reason": f"onnxruntime: {type(exc).__name__}: {exc}"[:500]}
        if keep:
            Path(keep).write_bytes(qdq.read_bytes())
    step = info.output_scale
    if step is None:
        block["notes"].append("the logits are not quantized (float output): logit differences are in absolute "
                              "units, not output steps")
    unit = step or 1.0
    why = _informative(cmp["outputs"], cmp["eval_size"])
    block.update(status="ok", eval_size=cmp["eval_size"], top1=cmp["top1"], top1_simulated=cmp["top1_simulated"],
                 argmax_agreement=cmp["argmax_agreement"], logit_diff_max_steps=round(cmp["diff_max"] / unit, 4),
                 logit_diff_mean_steps=round(cmp["diff_mean"] / unit, 4),
                 simulated_outputs=cmp["outputs"], agreement_informative=why is None, agreement_note=why)
    block["notes"] += _kernel_notes(block, int4_weights) + _latency_notes(block["latency"])
    return block


def _macs(qdq: Path, opt: Path, x) -> Dict[str, Any]:
    """integer_macs, or a block that says why the MACs could not be counted (the rest of the check stands)."""
    try:
        return integer_macs(qdq, opt, x)
    except Exception as exc:  # noqa: BLE001 - the card says so; kernels and agreement are still measured
        return {"share": None, "integer": None, "float": None, "float_ops": [], "float_layers": [], "unknown": [],
                "error": f"{type(exc).__name__}: {exc}"[:300]}


def _kernel_notes(block: Dict[str, Any], int4: bool) -> list:
    """What ran in float (the card shows the share of MACs on integer kernels from block["integer_macs"])."""
    macs = block["integer_macs"]
    notes = []
    if not block["integer_ops"]:
        notes.append("no integer kernel ran: onnxruntime fused none of the QDQ pairs")
    if macs.get("error"):
        notes.append(f"the share of MACs on integer kernels could not be counted: {macs['error']}")
    if int4 and block["export"].get("weight_types", {}).get("int4") and macs["float"]:
        notes.append("int4 weights (deploy.int4_weights): onnxruntime ran the convolutions/matmuls with int4 "
                     "weights in float (it has no integer convolution/gemm kernel for int4 weights); the default, "
                     "int8 containers holding the same 4-bit values, runs them on integer kernels")
    if macs["unknown"]:
        notes.append(f"{len(macs['unknown'])} conv/gemm/matmul node(s) did not run in the profiling call, so their "
                     f"MACs are not counted: {', '.join(macs['unknown'][:5])}")
    return notes


def _latency(session, ref_session, dataset, batch: int, runs: int, budget_s: float) -> Dict[str, Any]:
    return latency_row(batch, latency([session, ref_session], _example(dataset, batch).numpy(), runs, budget_s))


def latency_row(batch: int, t: Timing) -> Dict[str, Any]:
    """The card's latency row of one batch size from the timed runs (QDQ graph first, FP32 second)."""
    q, f = t.median(0), t.median(1)
    r = t.ratios()
    spread = t.spread()
    return {"batch_size": int(batch), "runs": len(t.times[0]), "int8_ms": round(q, 4), "fp32_ms": round(f, 4),
            "speedup": round(f / q, 3) if q > 0 else None,
            "int8_ms_iqr": [round(v, 4) for v in t.quartiles(t.times[0])],
            "fp32_ms_iqr": [round(v, 4) for v in t.quartiles(t.times[1])],
            "speedup_iqr": [round(v, 3) for v in t.quartiles(r)] if r else None,
            "spread": round(spread, 4) if spread != float("inf") else None, "seconds": round(t.seconds, 6),
            "large_spread": not spread <= SPREAD_SMALL}


def _latency_notes(rows) -> list:
    notes = []
    for r in rows:
        if r["large_spread"]:
            iqr = r.get("speedup_iqr") or [None, None]
            notes.append(f"batch {r['batch_size']}: large spread: the measured speedup's interquartile range is "
                         f"{iqr[0]}–{iqr[1]}× over {r['runs']} runs ({r['seconds']:.1f} s; more than "
                         f"{100 * SPREAD_SMALL:.0f} % of its median when the time budget ended): the machine was "
                         "busy or the timing is noisy at this size, so read the speedup as a range")
        if r["speedup"] is not None and r["speedup"] > ARITHMETIC_RATIO and r["large_spread"]:
            notes.append(f"batch {r['batch_size']}: the measured speedup {r['speedup']:.2f}× is above "
                         f"{ARITHMETIC_RATIO:.0f}× (32/8, FP32 over int8 operand width), but with the large spread "
                         "above it is not a measurement of the kernels: load on the machine can explain it")
        elif r["speedup"] is not None and r["speedup"] > ARITHMETIC_RATIO:
            notes.append(f"batch {r['batch_size']}: the measured speedup {r['speedup']:.2f}× is above "
                         f"{ARITHMETIC_RATIO:.0f}× (32/8, FP32 over int8 operand width, the most narrower "
                         "arithmetic gives by itself): the two graphs ran different kernel implementations "
                         "(onnxruntime's FP32 kernel is slower per MAC at this size than its int8 one), so the "
                         "ratio compares the runtime's kernels, not only the number formats")
    return notes
