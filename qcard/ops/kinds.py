"""Op kinds: which modules and functions are which op, defined once for the tracer (qcard.ops.tracer),
the fx and eager builders (qcard.quant.graph, qcard.quant.eager) and the cost tracer (qcard.cost.trace).

Two views of the same ops: the tracer sees torch function calls at run time and recognises them by
`__name__` (qcard.ops.opnames.FUNC_NAME_OPS); the fx builder sees graph nodes and recognises their targets by identity
(the *_FUNCS / *_METHODS tables). Both give the same op names (conv2d, linear, matmul, add, concat, ...).
"""
from __future__ import annotations

import operator
from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GEMM_OP", "gemm_type", "is_batch_norm", "module_kind", "RELU_MODULES", "NONLINEAR_MODULES", "AVGPOOL_MODULES",
    "MAXPOOL_MODULES", "PASS_MODULES", "UNSIMULATED_PARAM_MODULES", "MAXPOOL_FUNC_IDS", "RELU_FUNCS",
    "NONLINEAR_FUNCS", "NONLINEAR_METHODS", "RELU_METHODS", "BINARY_FUNCS", "BINARY_METHODS", "CAT_FUNCS",
    "MATMUL_FUNCS", "MATMUL_METHODS", "AVGPOOL_FUNCS", "MAXPOOL_FUNCS", "PASS_FUNCS", "PASS_METHODS",
    "FUNCTIONAL_GEMM", "nonlinear_op", "identity_in_eval",
]

# -- modules --------------------------------------------------------------------------------------

# conv/linear classes qcard quantizes, and the op each computes
GEMM_OP = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d", nn.ConvTranspose1d: "conv_transpose1d",
           nn.ConvTranspose2d: "conv_transpose2d", nn.ConvTranspose3d: "conv_transpose3d", nn.Linear: "linear"}


def gemm_type(m: nn.Module) -> Optional[Type[nn.Module]]:
    """The GEMM_OP class m is exactly, or whose quantized twin it is (qcard.quant.modules: a subclass
    that adds quantized_weight()); None for anything else, subclasses with their own forward included."""
    for base in GEMM_OP:
        if type(m) is base or (isinstance(m, base) and hasattr(type(m), "quantized_weight")):
            return base
    return None


def is_batch_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


RELU_MODULES = (nn.ReLU, nn.ReLU6)
NONLINEAR_MODULES = {
    nn.GELU: "gelu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Softmax: "softmax",
    nn.LogSoftmax: "log_softmax", nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.Mish: "mish",
    nn.LeakyReLU: "leaky_relu", nn.ELU: "elu", nn.SELU: "selu", nn.CELU: "celu", nn.Softplus: "softplus",
    nn.PReLU: "prelu", nn.LayerNorm: "layernorm", nn.GroupNorm: "groupnorm", nn.Softsign: "softsign",
    nn.InstanceNorm1d: "instancenorm", nn.InstanceNorm2d: "instancenorm", nn.InstanceNorm3d: "instancenorm",
    nn.LocalResponseNorm: "lrn", nn.Hardtanh: "hardtanh",
}
AVGPOOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                   nn.AdaptiveAvgPool3d)
MAXPOOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                   nn.AdaptiveMaxPool3d)
PASS_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                nn.AlphaDropout, nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle)
# modules with parameters that qcard does not simulate (weights and internal activations stay FP32)
UNSIMULATED_PARAM_MODULES = (nn.MultiheadAttention, nn.Embedding, nn.EmbeddingBag, nn.LSTM, nn.GRU, nn.RNN,
                             nn.Bilinear, nn.Transformer, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)

# subclasses of these are still that op on their input (timm's LayerNorm calls F.layer_norm itself)
_NORM_BASES = (nn.LayerNorm, nn.GroupNorm)


def nonlinear_op(m: nn.Module) -> Optional[str]:
    """The op of a non-linearity module (NONLINEAR_MODULES, or a subclass of a norm there), else None."""
    if type(m) in NONLINEAR_MODULES:
        return NONLINEAR_MODULES[type(m)]
    for base in _NORM_BASES:
        if isinstance(m, base):
            return NONLINEAR_MODULES[base]
    return None


# regularisers that are the identity in eval mode (stochastic depth / DropPath / DropBlock): by name,
# so that torchvision and timm need not be imported; for functions, the index and default of their
# `training` argument (None: drop_block, identity only at probability 0)
_IDENTITY_IN_EVAL_MODULES = frozenset({"StochasticDepth", "DropPath", "DropBlock2d"})
_IDENTITY_IN_EVAL_FUNCS = {"stochastic_depth": (3, True), "drop_path": (2, False), "drop_block_2d": None,
                           "drop_block_fast_2d": None}


def identity_in_eval(target: object, args: tuple = (), kwargs: Optional[dict] = None) -> bool:
    """A module in eval mode, or a call with training=False, that returns its input unchanged."""
    if isinstance(target, nn.Module):
        return type(target).__name__ in _IDENTITY_IN_EVAL_MODULES and not target.training
    name = getattr(target, "__name__", None)
    if name not in _IDENTITY_IN_EVAL_FUNCS:
        return False
    where = _IDENTITY_IN_EVAL_FUNCS[name]
    kwargs = kwargs or {}
    if where is None:                    # drop_block_*(x, drop_prob, ...)
        p = args[1] if len(args) > 1 else kwargs.get("drop_prob")
        return isinstance(p, (int, float)) and p == 0
    idx, default = where
    training = args[idx] if len(args) > idx else kwargs.get("training", default)
    return training is False


def module_kind(m: nn.Module) -> Tuple[str, str]:
    """(kind, op) of a module call. Kinds: gemm bn relu nonlinear avgpool maxpool pass unsimulated other."""
    gt = gemm_type(m)
    if gt is not None:
        return "gemm", GEMM_OP[gt]
    if is_batch_norm(m):
        return "bn", "batchnorm"
    if isinstance(m, nn.ReLU):
        return "relu", "relu"
    if isinstance(m, nn.ReLU6) or (type(m) is nn.Hardtanh and m.min_val == 0.0 and m.max_val == 6.0):
        return "relu", "relu6"
    if nonlinear_op(m) is not None:
        return "nonlinear", nonlinear_op(m)
    if isinstance(m, AVGPOOL_MODULES):
        return "avgpool", "avgpool"
    if isinstance(m, MAXPOOL_MODULES):
        return "maxpool", "maxpool"
    if isinstance(m, PASS_MODULES) or identity_in_eval(m):
        return "pass", type(m).__name__.lower()
    if isinstance(m, nn.Upsample) and m.mode == "nearest":
        return "pass", "upsample_nearest"
    if isinstance(m, UNSIMULATED_PARAM_MODULES) or any(True for _ in m.parameters(recurse=True)):
        return "unsimulated", type(m).__name__
    return "other", type(m).__name__


# -- functions, as the tracer sees them: by __name__ (torch-free tables in qcard.ops.opnames) ---------

# max-pool functions are boolean-dispatch wrappers all named "fn": recognised by identity
MAXPOOL_FUNC_IDS = frozenset(id(f) for f in (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d,
                                             F.adaptive_max_pool2d, F.adaptive_max_pool3d))

# -- functions and methods, as torch.fx sees them (graph node targets) ----------------------------

RELU_FUNCS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu", F.relu6: "relu6"}
NONLINEAR_FUNCS = {
    F.gelu: "gelu", F.silu: "silu", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh",
    F.tanh: "tanh", F.softmax: "softmax", torch.softmax: "softmax", F.log_softmax: "log_softmax",
    F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", F.mish: "mish", F.leaky_relu: "leaky_relu",
    F.elu: "elu", F.layer_norm: "layernorm", F.group_norm: "groupnorm", F.normalize: "normalize",
    torch.exp: "exp", F.softplus: "softplus",
}
NONLINEAR_METHODS = {"sigmoid": "sigmoid", "tanh": "tanh", "softmax": "softmax", "log_softmax": "log_softmax",
                     "exp": "exp"}
RELU_METHODS = {"relu": "relu", "relu_": "relu"}
# element-wise binary ops: a layer (add/mul) when both operands are tensors, else a scalar op
BINARY_FUNCS = {operator.add: "add", operator.iadd: "add", torch.add: "add", operator.sub: "sub",
                operator.isub: "sub", torch.sub: "sub", operator.mul: "mul", operator.imul: "mul", torch.mul: "mul",
                operator.truediv: "div", torch.div: "div"}
BINARY_METHODS = {"add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "mul": "mul", "mul_": "mul",
                  "div": "div", "div_": "div"}
CAT_FUNCS = {torch.cat: "concat", torch.concat: "concat", torch.stack: "stack"}
MATMUL_FUNCS = {torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "matmul", torch.mm: "matmul"}
MATMUL_METHODS = {"matmul": "matmul", "bmm": "matmul", "mm": "matmul"}
AVGPOOL_FUNCS = {F.avg_pool1d: "avgpool", F.avg_pool2d: "avgpool", F.avg_pool3d: "avgpool",
                 F.adaptive_avg_pool1d: "avgpool", F.adaptive_avg_pool2d: "avgpool",
                 F.adaptive_avg_pool3d: "avgpool", torch.mean: "mean"}
MAXPOOL_FUNCS = {F.max_pool1d: "maxpool", F.max_pool2d: "maxpool", F.max_pool3d: "maxpool",
                 F.adaptive_max_pool1d: "maxpool", F.adaptive_max_pool2d: "maxpool",
                 F.adaptive_max_pool3d: "maxpool", torch.max_pool2d: "maxpool", torch.max_pool1d: "maxpool"}
# ops that keep the quantization grid (shape and selection ops)
PASS_FUNCS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
              operator.getitem, torch.narrow, torch.chunk, torch.split, torch.unbind, torch.t, F.dropout,
              F.dropout1d, F.dropout2d, torch.select, torch.movedim, torch.swapaxes, F.pixel_shuffle,
              torch.clone, torch.flip, torch.roll, torch.repeat_interleave}
PASS_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
                "expand", "expand_as", "t", "narrow", "chunk", "split", "unbind", "select", "clone", "detach",
                "to", "float", "type_as", "view_as", "reshape_as", "flip", "roll", "repeat", "movedim",
                "swapaxes", "unflatten", "cpu", "cuda"}
# functional conv/linear (a weight operand that is not an nn.Conv/nn.Linear module's)
FUNCTIONAL_GEMM = {F.linear: "linear", F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d"}
