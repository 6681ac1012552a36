"""Op kinds of torch functions by `__name__` (builtins and Tensor methods), as the op tracer sees
them, and which of them the cost model records. Pure data, no torch import: the cost package reads
COST_OPS without loading torch. Module and fx-target tables: qcard.ops.kinds."""
from __future__ import annotations

__all__ = ["FUNC_NAME_OPS", "NONLINEAR_FUNC_NAMES", "COST_OPS", "SHAPE_QUERIES"]

FUNC_NAME_OPS = {
    "conv1d": "conv1d", "conv2d": "conv2d", "conv3d": "conv3d",
    "conv_transpose1d": "conv_transpose1d", "conv_transpose2d": "conv_transpose2d",
    "conv_transpose3d": "conv_transpose3d",
    "linear": "linear",
    "matmul": "matmul", "__matmul__": "matmul", "__rmatmul__": "matmul", "mm": "matmul",
    "bmm": "matmul", "baddbmm": "matmul", "addmm": "matmul",
    "scaled_dot_product_attention": "attention",
    "multi_head_attention_forward": "mha",
    "add": "add", "add_": "add", "__add__": "add", "__iadd__": "add", "__radd__": "add",
    "mul": "mul", "mul_": "mul", "__mul__": "mul", "__imul__": "mul", "__rmul__": "mul",
    "cat": "concat", "concat": "concat", "concatenate": "concat",
    "avg_pool1d": "avgpool", "avg_pool2d": "avgpool", "avg_pool3d": "avgpool",
    "adaptive_avg_pool1d": "avgpool", "adaptive_avg_pool2d": "avgpool", "adaptive_avg_pool3d": "avgpool",
    "max_pool1d_with_indices": "maxpool", "max_pool2d_with_indices": "maxpool",
    "max_pool3d_with_indices": "maxpool", "adaptive_max_pool2d_with_indices": "maxpool",
    "layer_norm": "layernorm", "softmax": "softmax",
    # non-linearities the eager builder lists when forward code calls them (not cost layers)
    "gelu": "gelu", "silu": "silu", "sigmoid": "sigmoid",
}
NONLINEAR_FUNC_NAMES = frozenset({"gelu", "silu", "sigmoid"})
# the ops the cost model records (all of the above but the non-linearities; mha is expanded)
COST_OPS = frozenset(v for v in FUNC_NAME_OPS.values() if v not in NONLINEAR_FUNC_NAMES and v != "mha")
# calls that read a tensor's metadata, not its values (not a use in the data flow)
SHAPE_QUERIES = frozenset({"size", "dim", "__get__", "shape"})
