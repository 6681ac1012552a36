"""Execution order of a model's candidate layers, and which layer produced each one's input, read from
the shared op tracer (qcard.ops.trace_ops): MARViN's BN-after-conv detection (a BN whose input is its
conv's untouched output)."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple


def execution_order(model, candidates: Dict[str, Any], input_shape) -> Tuple[List[str], Dict[str, str]]:
    """(names in the order they first run, {name: the candidate whose untouched output is its input})
    from one forward pass on zeros in eval mode."""
    import torch
    from ...ops import trace_ops
    dev = next(model.parameters()).device
    trace = trace_ops(model, torch.zeros((1, *tuple(input_shape)), device=dev))
    order: List[str] = []
    inputs: Dict[str, Tuple[int, int]] = {}
    produced: Dict[Tuple[int, int], str] = {}      # (id, version) of each output -> its module
    for c in trace.calls:
        if c.path not in candidates:
            continue
        order.append(c.path)
        if c.inputs:
            inputs.setdefault(c.path, (c.inputs[0], c.input_versions[0]))
        if c.output is not None:
            produced.setdefault((c.output, c.output_version), c.path)
    source = {n: produced[key] for n, key in inputs.items() if key in produced}
    return list(dict.fromkeys(order)), source
