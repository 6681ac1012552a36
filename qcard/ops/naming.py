"""Layer names: the names cards, cost records, quantizers and method records share.

The rules (one place; the tracer and the fx builder both follow them):
  - an op whose weight is a parameter of the model is named after that parameter's owner
    ("layer1.0.conv1"; "...self_attention.in_proj" for an `in_proj_weight`);
  - a module the fx graph calls, or the first op a leaf module runs, is named by its module path
    ("maxpool"; F.conv2d inside a conv whose weight is computed, not a parameter);
  - any other op is "<innermost module path>.<op>", counted per module and op: "layer1.0.add",
    "layer1.0.add_1", "blocks.0.attn.matmul_1" ("add" alone at the top level);
  - a name already taken gets "_1", "_2", ... until it is free.
"""
from __future__ import annotations

from typing import Dict, Optional

__all__ = ["LayerNamer", "weight_owner"]


def weight_owner(param_name: str) -> str:
    """The layer a weight parameter names: "fc.weight" -> "fc"; "attn.in_proj_weight" -> "attn.in_proj"."""
    if param_name.endswith(".weight"):
        return param_name[: -len(".weight")]
    if param_name == "weight":
        return ""
    if param_name.endswith("_weight"):       # nn.MultiheadAttention.in_proj_weight -> ...in_proj
        return param_name[: -len("_weight")]
    return param_name


class LayerNamer:
    """Hands out unique layer names, counting ops per module scope."""

    def __init__(self) -> None:
        self.used: Dict[str, int] = {}

    def unique(self, name: str) -> str:
        """name, or name_1, name_2, ... when it is taken (a module that runs twice, colliding names)."""
        candidate, n = name, self.used.get(name, 0)
        while candidate in self.used:
            n += 1
            candidate = f"{name}_{n}"
        self.used[name] = n
        self.used.setdefault(candidate, 0)
        return candidate

    @staticmethod
    def scoped(counts: Dict[str, int], path: str, op: str) -> str:
        """"<path>.<op>", with "_<n>" for the n-th such op of that scope (counts: the scope's counter)."""
        n = counts.get(op, 0)
        counts[op] = n + 1
        base = f"{path}.{op}" if path else op
        return base if n == 0 else f"{base}_{n}"

    def op_name(self, counts: Dict[str, int], path: str, op: str, *, owner: Optional[str] = None,
                computed_weight: bool = False, in_leaf: bool = False) -> str:
        """The name of an op run in module `path` (counts: that module call's counter per op).
        owner: the weight parameter's layer (weight_owner), when the weight is a parameter;
        computed_weight: the weight operand is not a parameter (e.g. fake-quantized on the fly): it
        belongs to the module computing it; in_leaf: `path` is a leaf module (its first op takes its name)."""
        if owner is not None:
            return self.unique(owner or op)
        n = counts.get(op, 0)
        name = self.scoped(counts, path, op)
        if path and ((computed_weight and n == 0) or (in_leaf and sum(counts.values()) == 1)):
            name = path
        return self.unique(name or op)
