"""Execution order of a model's candidate layers, and which layer produced each one's input: MARViN's
one place for BN-after-conv detection (a BN whose input is its conv's untouched output), to be
replaced by the shared op tracer."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple


def execution_order(model, candidates: Dict[str, Any], input_shape) -> Tuple[List[str], Dict[str, str]]:
    """(names in the order they first run, {name: the candidate whose untouched output is its input})
    from one forward pass on zeros in eval mode."""
    import torch
    order: List[str] = []
    inputs: Dict[str, Tuple[int, int]] = {}
    produced: Dict[Tuple[int, int], str] = {}      # (id, version) of each output -> its module
    alive: List[Any] = []                          # keep inputs/outputs alive so ids stay unique

    def pre(mod, args, n):
        order.append(n)
        if args and isinstance(args[0], torch.Tensor):
            alive.append(args[0])
            inputs.setdefault(n, (id(args[0]), args[0]._version))

    def post(mod, args, out, n):
        if isinstance(out, torch.Tensor):
            alive.append(out)
            produced.setdefault((id(out), out._version), n)

    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: pre(mod, args, n)) for n, m in candidates.items()]
    handles += [m.register_forward_hook(lambda mod, args, out, n=n: post(mod, args, out, n))
                for n, m in candidates.items()]
    was_training = model.training
    try:
        model.eval()
        dev = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros((1, *tuple(input_shape)), device=dev))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    source = {n: produced[key] for n, key in inputs.items() if key in produced}
    return list(dict.fromkeys(order)), source
