"""F.scaled_dot_product_attention written out in a traced graph: q·kᵀ·scale, softmax, ·v.

Why: the fused kernel keeps the softmax output P in FP32 between its two matmuls, so a simulated model
that leaves the call fused computes P·v with a float operand, which no integer runtime does (it runs the
two matmuls as integer kernels, with P quantized). Written out, the fx builder places quantizers on q, k,
the softmax's input and output (P) and v, as it does for torchvision's nn.MultiheadAttention
(quant.modules.SplitMultiheadAttention) and timm's non-fused attention; the ops and their names
("<module>.matmul", ".softmax", ".matmul_1") are those the op tracer gives the fused call
(qcard.ops.tracer.SDPA_PARTS), so the records match the cost tracer's.

A call is written out only in the form covered here: no attention mask, is_causal False, dropout_p 0, no
grouped-query attention, and a constant scale or none (then 1/√E, E = q's last dimension). Each written-
out call is then checked on the example input against the fused kernel's own output on the same q, k, v:
it must agree within rtol = RTOL and atol = ATOL·(1 + max |fused output|) (float rounding only: the
scale is applied after q·kᵀ instead of to q and k), or that call is put back as it was. A call left
fused is reported by the caller with P·v's first operand in FP32 (qcard.quant.graph).
"""
from __future__ import annotations

import math
import operator
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from ..ops.tracer import SDPA_ARGS

__all__ = ["write_out_attention", "fused_attention_reason", "sdpa_args", "RTOL", "ATOL", "TOLERANCE_TEXT"]

RTOL = 1e-4
ATOL = 1e-5
TOLERANCE_TEXT = f"rtol {RTOL:g}, atol {ATOL:g}·(1 + max |output|)"
# the node meta key naming a written-out op: "scores" | "softmax" | "context"
PART_KEY = "qcard_sdpa_part"


def sdpa_args(node: fx.Node) -> Dict[str, Any]:
    """The call's arguments by name (F.scaled_dot_product_attention's signature; defaults omitted)."""
    a = dict(zip(SDPA_ARGS, node.args))
    a.update(node.kwargs)
    return a


def fused_attention_reason(node: fx.Node) -> Optional[str]:
    """Why this call is not written out (None: it can be)."""
    a = sdpa_args(node)
    if a.get("attn_mask") is not None:
        return "it is called with an attention mask"
    if a.get("is_causal", False) is not False:
        return "is_causal is set (or computed at run time)"
    if a.get("dropout_p", 0.0) != 0:
        return "dropout_p is not 0"
    if a.get("enable_gqa", False) is not False:
        return "grouped-query attention (enable_gqa)"
    scale = a.get("scale")
    if scale is not None and not isinstance(scale, (int, float)):
        return "its scale is computed at run time"
    q, k, v = a.get("query"), a.get("key"), a.get("value")
    if not all(isinstance(t, fx.Node) for t in (q, k, v)):
        return "its query, key or value is not a traced tensor"
    tm = q.meta.get("tensor_meta")
    if not hasattr(tm, "shape") or len(tm.shape) < 2:
        return "the query's shape is unknown"
    return None


def _write_out(graph: fx.Graph, node: fx.Node) -> Tuple[fx.Node, List[fx.Node]]:
    """Insert the written-out form after `node`; its users now read the new output."""
    a = sdpa_args(node)
    q, k, v = a["query"], a["key"], a["value"]
    scale = a.get("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(int(q.meta["tensor_meta"].shape[-1]))
    meta = {key: node.meta[key] for key in ("nn_module_stack", "stack_trace") if key in node.meta}
    made: List[fx.Node] = []

    def add(op: str, target: Any, args: tuple, part: Optional[str] = None) -> fx.Node:
        with graph.inserting_after(made[-1] if made else node):
            n = graph.create_node(op, target, args)
        n.meta.update(meta)
        if part is not None:
            n.meta[PART_KEY] = part
        made.append(n)
        return n

    kt = add("call_method", "transpose", (k, -2, -1))
    scores = add("call_function", torch.matmul, (q, kt), "scores")
    scaled = add("call_function", operator.mul, (scores, float(scale)))
    p = add("call_function", torch.softmax, (scaled, -1), "softmax")
    out = add("call_function", torch.matmul, (p, v), "context")
    node.replace_all_uses_with(out)
    return out, made


class _Check(ShapeProp):
    """Shape propagation that also compares each written-out output with the fused call's."""

    def __init__(self, gm: fx.GraphModule, pairs: Dict[fx.Node, fx.Node]):
        super().__init__(gm)
        self.pairs = pairs                      # written-out output -> fused call
        self.agree: Dict[fx.Node, Tuple[bool, float]] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        fused = self.pairs.get(n)
        if fused is not None:
            ref = self.env[fused]
            ok, diff = False, math.inf
            if isinstance(result, torch.Tensor) and isinstance(ref, torch.Tensor) and result.shape == ref.shape:
                big = float(ref.abs().max()) if ref.numel() else 0.0
                ok = torch.allclose(result, ref, rtol=RTOL, atol=ATOL * (1.0 + big))
                diff = float((result - ref).abs().max()) if ref.numel() else 0.0
            self.agree[fused] = (ok, diff)
        return result


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    val = list(stack.values())[-1]
    return val[0] if isinstance(val, tuple) else str(val)


@torch.no_grad()
def write_out_attention(gm: fx.GraphModule, example: torch.Tensor) -> Tuple[int, List[str]]:
    """Write out, in place, every F.scaled_dot_product_attention call of `gm` that can be (see the module
    docstring), check each on `example`, and leave shapes propagated (tensor_meta) on the final graph.
    Returns (calls written out, notes on the calls left fused: where and why)."""
    graph = gm.graph
    calls = [n for n in graph.nodes if n.op == "call_function" and n.target is F.scaled_dot_product_attention]
    if not calls:
        return 0, []
    notes: List[str] = []
    pairs: Dict[fx.Node, fx.Node] = {}
    made: Dict[fx.Node, List[fx.Node]] = {}
    for node in calls:
        why = fused_attention_reason(node)
        if why is not None:
            notes.append(f"F.scaled_dot_product_attention in '{_scope(node)}' left fused ({why}): its softmax "
                         "output P stays FP32 inside the kernel, and P·v is recorded with an FP32 operand")
            continue
        out, nodes = _write_out(graph, node)
        pairs[out], made[node] = node, nodes
    if not pairs:
        return 0, notes
    gm.recompile()
    check = _Check(gm, pairs)
    check.propagate(example)
    done = 0
    for out, node in pairs.items():
        ok, diff = check.agree.get(node, (False, math.inf))
        if ok:
            graph.erase_node(node)
            done += 1
            continue
        out.replace_all_uses_with(node)
        for n in reversed(made[node]):
            graph.erase_node(n)
        notes.append(f"F.scaled_dot_product_attention in '{_scope(node)}' left fused: written out, it differed "
                     f"from the fused kernel by {diff:.3g} on the example (allowed: {TOLERANCE_TEXT}); its softmax "
                     "output P stays FP32 inside the kernel, and P·v is recorded with an FP32 operand")
    graph.lint()
    gm.recompile()
    return done, notes
