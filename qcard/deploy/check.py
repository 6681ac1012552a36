"""The deploy check of one point: export, run on onnxruntime beside the simulation, time both graphs.

Returns the card's `deployment` block (qcard.cards.schema.Deployment) as a dict.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from ..evaluate import top_classes
from .export import NotDeployable, card_problem, export_onnx
from .runtime import EXECUTION_PROVIDER, latency_ms, make_session, op_counts, require_runtime, run

__all__ = ["deploy_check", "check_extra", "card_problem"]


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
    """Top-1 of the runtime and of the simulation on the same images, argmax agreement, logit diffs."""
    dev = _device(sim)
    hit_rt = hit_sim = agree = total = 0
    diff_max, diff_sum, count = 0.0, 0.0, 0
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
        d = (out - ref).abs()
        diff_max = max(diff_max, float(d.max()))
        diff_sum += float(d.double().sum())
        count += d.numel()
    return {"eval_size": total, "top1": round(100.0 * hit_rt / total, 4),
            "top1_simulated": round(100.0 * hit_sim / total, 4), "argmax_agreement": round(agree / total, 6),
            "diff_max": diff_max, "diff_mean": diff_sum / max(count, 1)}


def _example(dataset, n: int) -> torch.Tensor:
    """n images of the eval set (repeated when it has fewer) as one batch."""
    xs = [dataset[i % len(dataset)][0] for i in range(n)]
    return torch.stack([torch.as_tensor(x) for x in xs]).float()


def deploy_check(sim_model: nn.Module, dataset, *, threads: int = 1, batch_sizes: Sequence[int] = (1, 32),
                 latency_runs: int = 20, opset: Optional[int] = None, method: Optional[str] = None,
                 simulated_speedup: Optional[float] = None, eval_batch_size: int = 256,
                 workdir: Optional[str] = None, keep: Optional[str] = None) -> Dict[str, Any]:
    """Export `sim_model` as ONNX QDQ, run it on onnxruntime (CPU, `threads`) over `dataset` (the images the
    simulation was scored on) beside the simulated model, and time it against the same graph in FP32.
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
            info = export_onnx(sim_model, example, qdq, opset=opset, method=method)
            export_onnx(sim_model, example, fp32, opset=info.opset, fp32=True)
        except NotDeployable as exc:
            return {**block, "status": "not_deployable", "reason": str(exc)}
        except Exception as exc:  # noqa: BLE001 - the card says what failed; the simulation's results stand
            return {**block, "status": "failed", "reason": f"export: {type(exc).__name__}: {exc}"[:500]}
        block.update(opset=info.opset, export=info.as_dict(), notes=list(info.notes))
        try:
            session = make_session(qdq, threads, opt)
            block["integer_ops"], block["float_ops"] = op_counts(opt)
            cmp = _compare(sim_model, session, dataset, eval_batch_size)
            ref_session = make_session(fp32, threads)
            block["latency"] = [_latency(session, ref_session, dataset, b, latency_runs) for b in batch_sizes]
        except Exception as exc:  # noqa: BLE001
            return {**block, "status": "failed", "reason": f"onnxruntime: {type(exc).__name__}: {exc}"[:500]}
        if keep:
            Path(keep).write_bytes(qdq.read_bytes())
    step = info.output_scale
    if step is None:
        block["notes"].append("the logits are not quantized (float output): logit differences are in absolute "
                              "units, not output steps")
    unit = step or 1.0
    block.update(status="ok", eval_size=cmp["eval_size"], top1=cmp["top1"], top1_simulated=cmp["top1_simulated"],
                 argmax_agreement=cmp["argmax_agreement"], logit_diff_max_steps=round(cmp["diff_max"] / unit, 4),
                 logit_diff_mean_steps=round(cmp["diff_mean"] / unit, 4))
    if not block["integer_ops"]:
        block["notes"].append("no integer kernel ran: onnxruntime fused none of the QDQ pairs")
    return block


def _latency(session, ref_session, dataset, batch: int, runs: int) -> Dict[str, Any]:
    x = _example(dataset, batch).numpy()
    int8, fp = latency_ms([session, ref_session], x, runs)
    return {"batch_size": int(batch), "runs": int(runs), "int8_ms": round(int8, 4), "fp32_ms": round(fp, 4),
            "speedup": round(fp / int8, 3) if int8 > 0 else None}
