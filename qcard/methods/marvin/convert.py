"""Turn a model's conv/linear/BN/avg-pool layers into fixed-point layers: each conv/linear owns a
format; BN and average pooling use the format of the conv/linear that ran just before them."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

from .fixed_point import FixedPointState, RoundingSource, attach, kind
from .state import LayerState
from .trace import execution_order


def candidates_of(model) -> Dict[str, Any]:
    """The layers MARViN quantizes (those inside nn.MultiheadAttention excepted: it calls them its own way)."""
    from torch import nn
    inside_mha = set()
    for mname, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            inside_mha.update(f"{mname}.{c}" if mname else c for c, _ in m.named_modules() if c)
    return {n: m for n, m in model.named_modules() if kind(m) and n not in inside_mha}


def _owner_state(n: str, m, p, rec) -> LayerState:
    from torch import nn
    return LayerState(name=n, module=m, wl=p.initial_wl, fl=p.initial_fl, lookback=p.min_lookback,
                      resolution=p.min_resolution,
                      macs=int(rec.macs) if rec else 0,
                      params=int(rec.params) if rec else sum(t.numel() for t in m.parameters(recurse=False)),
                      act_elems=int(math.prod(rec.input_shape)) if rec and rec.input_shape else 0,
                      op=rec.op if rec else ("linear" if isinstance(m, nn.Linear) else "conv2d"),
                      trace_extra=dict(rec.extra) if rec else {})


def group_layers(ordered: List[str], candidates: Dict[str, Any], p, trace) -> Tuple[Dict[str, LayerState], Dict[str, str]]:
    """Owners (conv/linear) with their states, and {attached layer: its owner}, in execution order."""
    owners: Dict[str, LayerState] = {}
    attached_to: Dict[str, str] = {}
    pending: List[str] = []
    current = None
    for n in ordered:
        if kind(candidates[n]) == "owner":
            current = owners[n] = _owner_state(n, candidates[n], p, trace.get(n))
            for a in pending:            # layers that ran before any conv/linear: the first one
                attached_to[a] = n
                current.attached.append(a)
            pending = []
        elif current is None:
            pending.append(n)
        else:
            attached_to[n] = current.name
            current.attached.append(n)
    if not owners:
        raise ValueError("marvin needs at least one conv or linear layer that runs in the forward pass; "
                         "this model has none")
    return owners, attached_to


def convert(model, p, trace, input_shape, source: RoundingSource):
    """(owners, attached_to, not_executed): the model's layers made fixed-point, in place."""
    candidates = candidates_of(model)
    ordered, produced_by = execution_order(model, candidates, input_shape)
    not_executed = [n for n in candidates if n not in set(ordered)]
    owners, attached_to = group_layers(ordered, candidates, p, trace)
    group = {n: attached_to.get(n, n) for n in ordered}
    for n in ordered:
        st = owners.get(n) or owners[attached_to[n]]
        # an input that is, untouched, the output of a layer with the same format is already on
        # the grid: quantizing it again changes nothing (e.g. BN after its conv), so skip the work
        src = produced_by.get(n)
        skip = src is not None and src != n and group.get(src) == group[n]
        attach(candidates[n], FixedPointState(wl=st.wl, fl=st.fl, eval_rounding=p.eval_rounding, skip_input=skip,
                                              source=source))
    return owners, attached_to, not_executed
