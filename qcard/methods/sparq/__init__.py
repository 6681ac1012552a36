"""SPARQ: sparsity-aware post-training activation quantization (Shomron et al., NeurIPS 2021).

One job per file:
  kernels.py    bSPARQ / vSPARQ on 8-bit codes (tables, SparqKernel, the public functions and statistics)
  params.py     the method's parameters (SparqParams) and SparqError
  observers.py  range observer of a layer's input; statistics of plain activation quantizers
  layers.py     SparqConv2d / SparqLinear (observe, then the integer simulation) and the swap
  passes.py     calibration / BN-recalibration passes, batch norms in train mode
  bn_fold.py    BN-after-conv detection and folding (base "qcard")
  select.py     which layers run SPARQ, which stay FP32 (and why)
  cost.py       the PE cost comparison (A8W8, plain A4W8, SPARQ on systolic-ws)
  blocks.py     the card's method_stats.sparq and quantization blocks
  card.py       the card's sections (tables and the window plot), plain data
  method.py     the method (SPARQ, registered as "sparq")
"""
from .kernels import WINDOW_SETS, SparqKernel, bsparq, sparq_stats, vsparq, vsparq_only, window_lut
from .layers import SparqConv2d, SparqLinear
from .method import SPARQ
from .params import SparqError, SparqParams

__all__ = [
    "WINDOW_SETS",
    "bsparq",
    "vsparq",
    "vsparq_only",
    "sparq_stats",
    "SparqKernel",
    "window_lut",
    "SPARQ",
    "SparqParams",
    "SparqError",
    "SparqConv2d",
    "SparqLinear",
]
