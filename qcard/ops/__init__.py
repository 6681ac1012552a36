"""The ops of a model, discovered once: op kinds (kinds.py), layer names (naming.py) and the op tracer
(tracer.py), which the cost tracer, the fx and eager builders, BN folding and the methods share."""
from .kinds import gemm_type, is_batch_norm
from .naming import LayerNamer, weight_owner
from .tracer import ModuleCall, Op, OpTrace, trace_ops

__all__ = ["trace_ops", "OpTrace", "Op", "ModuleCall", "LayerNamer", "weight_owner", "gemm_type",
           "is_batch_norm"]
