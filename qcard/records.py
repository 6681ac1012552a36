"""Per-layer records: the one interface between methods and the cost model (pure Python).

Shape fields come from tracing the model (qcard.cost.trace); quantization fields are filled in
by the method that produced the simulated model. Bits of None mean the tensor stays FP32.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Tuple


@dataclass
class LayerRecord:
    name: str                       # module path or fx node name, e.g. "layer1.0.conv1"
    op: str                         # conv2d | linear | matmul | add | concat | avgpool | maxpool | layernorm | softmax | gelu | ...
    input_shape: Tuple[int, ...] = ()   # batch dimension included (batch 1 for cost)
    output_shape: Tuple[int, ...] = ()
    weight_shape: Tuple[int, ...] = ()
    kernel_size: Tuple[int, ...] = ()
    stride: Tuple[int, ...] = ()
    padding: Tuple[int, ...] = ()
    groups: int = 1
    params: int = 0                 # parameters owned by this layer (weight + bias)
    macs: int = 0                   # multiply-accumulates for one input (conv/linear/matmul)
    # quantization, as the simulated model does it
    weight_bits: Optional[float] = None
    activation_bits: Optional[float] = None       # bits of this layer's input activations
    output_bits: Optional[float] = None           # bits of the requantized output, if any
    weight_granularity: Optional[str] = None      # per_tensor | per_channel | per_group
    weight_symmetric: Optional[bool] = None
    activation_granularity: Optional[str] = None
    activation_symmetric: Optional[bool] = None
    weight_sparsity: float = 0.0                  # fraction of exactly-zero weights
    # dynamic precision: distribution {bits: probability}; the cost model uses its expectation
    activation_bits_distribution: Optional[Dict[float, float]] = None
    weight_bits_distribution: Optional[Dict[float, float]] = None
    quantized: bool = True
    reason: Optional[str] = None                  # why a layer was left unquantized
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def effective_weight_bits(self) -> Optional[float]:
        return _expected(self.weight_bits_distribution, self.weight_bits)

    @property
    def effective_activation_bits(self) -> Optional[float]:
        return _expected(self.activation_bits_distribution, self.activation_bits)

    def to_dict(self) -> dict:
        return asdict(self)


def _expected(dist: Optional[Dict[float, float]], fixed: Optional[float]) -> Optional[float]:
    if not dist:
        return fixed
    total = sum(dist.values())
    return sum(float(b) * p for b, p in dist.items()) / total if total else fixed
