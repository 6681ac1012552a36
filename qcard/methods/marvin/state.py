"""What the controller keeps per conv/linear layer (its format, switching counters, trajectory)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List


@dataclass
class LayerState:
    name: str
    module: Any
    wl: int
    fl: int
    lookback: int
    resolution: int
    k: int = 0
    grad_sum: Any = None
    sparsity: float = 0.0
    macs: int = 0
    params: int = 0
    act_elems: int = 0
    op: str = ""
    trace_extra: Dict[str, Any] = field(default_factory=dict)
    attached: List[str] = field(default_factory=list)
    trajectory: List[Dict[str, Any]] = field(default_factory=list)
    steps_at_wl: Dict[int, int] = field(default_factory=dict)
    decisions: int = 0

