"""Reconstruction units of a simulated model: single layers, or blocks found on the captured graph.

MQBench's rule, read off the fx graph (never from hand-written module classes):
  - a "layer" is a conv/linear with what follows it up to and including its output quantizer (batch
    norm when kept, the activation);
  - a residual block is the span from a fork to the add that joins its branches (BasicBlock,
    Bottleneck, inverted residual with skip), with the add's own output quantizer: one unit;
  - layers outside residual blocks merge, up to `max_layers` in a row, when each feeds only the next.
A unit must read exactly one tensor from outside (its input) and be read from outside only through
its last node; a span that breaks this is split into its layers.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set

import torch
import torch.fx as fx
from torch import nn

from .calibrate import sim_info
from .quantizer import FakeQuantize

__all__ = ["Unit", "layer_units", "block_units", "units_record"]

_ADDS = (operator.add, operator.iadd, torch.add)


@dataclass
class Unit:
    name: str
    kind: str                                   # layer | block | residual
    layers: List[str]                           # conv/linear record names, in graph order
    modules: List[nn.Module]                    # those layers' modules
    nodes: List[fx.Node] = field(default_factory=list)   # the graph span (block units)
    input: Optional[fx.Node] = None                       # the one node it reads from outside


def layer_units(model: nn.Module) -> List[Unit]:
    """One unit per quantized conv/linear (AdaRound), in topological order; shared modules once."""
    info = sim_info(model)
    units, seen = [], set()
    for li in info.gemm_layers():
        if li.weight_quantizer is None or id(li.module) in seen:
            continue
        seen.add(id(li.module))
        units.append(Unit(li.name, "layer", [li.name], [li.module]))
    return units


def block_units(model: nn.Module, max_layers: int = 3) -> List[Unit]:
    info = sim_info(model)
    if not isinstance(model, fx.GraphModule):
        raise ValueError(f"block reconstruction needs the captured (fx) graph; this model was built in "
                         f"{info.graph_mode} mode ({info.graph_mode_reason or 'no graph'}): use unit: layer")
    gemm = {id(li.module): li for li in info.gemm_layers() if li.weight_quantizer is not None}
    nodes = [n for n in model.graph.nodes]
    pos = {n: i for i, n in enumerate(nodes)}
    mod_of = {n: model.get_submodule(str(n.target)) for n in nodes if n.op == "call_module"}
    is_gemm = {n: id(mod_of[n]) in gemm for n in mod_of}
    anc: Dict[fx.Node, Set[fx.Node]] = {}
    for n in nodes:
        s: Set[fx.Node] = set()
        for a in n.all_input_nodes:
            s |= anc[a] | {a}
        anc[n] = s

    def tail(n: fx.Node) -> List[fx.Node]:
        """n and what follows it alone, up to and including the first quantizer."""
        span = [n]
        while not isinstance(mod_of.get(span[-1]), FakeQuantize):
            users = list(span[-1].users)
            if len(users) != 1:
                break
            u = users[0]
            if u.op == "output" or is_gemm.get(u) or len(u.all_input_nodes) != 1:
                break
            span.append(u)
        return span

    # residual blocks: fork .. add
    spans: List[Set[fx.Node]] = []
    for n in nodes:
        if not (n.op == "call_function" and n.target in _ADDS and len(n.all_input_nodes) == 2):
            continue
        a, b = n.all_input_nodes
        common = (anc[a] | {a}) & (anc[b] | {b})
        if not common:
            continue
        fork = max(common, key=pos.get)
        body = {m for m in nodes if pos[fork] < pos[m] <= pos[n] and fork in anc[m] and (m is n or m in anc[n])}
        if not any(is_gemm.get(m) for m in body):
            continue
        body |= set(tail(n))
        for s in [s for s in spans if s & body]:          # nested or overlapping: one block
            spans.remove(s)
            body |= s
        spans.append(body)
    in_block = set().union(*spans) if spans else set()
    # layer spans outside residual blocks, merged in runs
    runs: List[List[Set[fx.Node]]] = []
    for n in nodes:
        if not is_gemm.get(n) or n in in_block:
            continue
        span = set(tail(n))
        prev = runs[-1] if runs else None
        if prev is not None and len(prev) < max_layers:
            last = max(prev[-1], key=pos.get)
            if n.all_input_nodes == [last] and len(last.users) == 1:
                prev.append(span)
                continue
        runs.append([span])
    candidates = [("residual", s) for s in spans] + [("block" if len(r) > 1 else "layer", r) for r in runs]
    units: List[Unit] = []
    for kind, item in candidates:
        if kind == "residual":
            parts = [item]
        else:
            parts = [set().union(*item)]
        u = _make_unit(model, kind, parts[0], pos, mod_of, gemm)
        if u is None:                                        # not a single-input span: its layers alone
            for n in sorted(parts[0], key=pos.get):
                if is_gemm.get(n):
                    lu = _make_unit(model, "layer", set(tail(n)), pos, mod_of, gemm)
                    if lu is None:
                        raise ValueError(f"layer {gemm[id(mod_of[n])].name} reads more than one tensor")
                    units.append(lu)
        else:
            units.append(u)
    units.sort(key=lambda u: pos[u.nodes[0]])
    return units


def _make_unit(model, kind, body: Set[fx.Node], pos, mod_of, gemm) -> Optional[Unit]:
    for n in list(body):                                # parameters read inside the unit travel with it
        body |= {a for a in n.all_input_nodes if a.op == "get_attr"}
    order = sorted(body, key=pos.get)
    ext = {a for n in order for a in n.all_input_nodes if a not in body}
    last = order[-1]
    leaks = [n for n in order if n is not last and any(u not in body for u in n.users)]
    if len(ext) != 1 or leaks:
        return None
    mods = [mod_of[n] for n in order if n in mod_of and id(mod_of[n]) in gemm]
    names = [gemm[id(m)].name for m in mods]
    name = names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"
    return Unit(name, kind, names, mods, order, next(iter(ext)))


def units_record(units: List[Unit]) -> List[Dict[str, object]]:
    """The unit list as the card shows it: boundaries by layer name."""
    return [{"unit": u.name, "kind": u.kind, "first": u.layers[0], "last": u.layers[-1], "layers": list(u.layers)}
            for u in units]
