"""The sparq method: SPARQ on a model (swap conv/linear layers for their SPARQ twins, calibrate the
8-bit base model, convert, recalibrate BN, measure) and the card's blocks and sections.

What runs (base "paper", the authors' code):
  * quantized layers: every nn.Conv2d and nn.Linear except the first and the last MAC layer
    (first conv and final FC stay FP32). Hidden Linear layers (not in the paper's CNNs) are
    treated like convs by default (a choice: hidden_linear="fp32" keeps them FP32).
  * weights: symmetric per output channel, dw = 2*max|w|/255, codes clamp(round(w/dw), -128, 127),
    computed once and cached as integer-valued float32 tensors.
  * activations (inputs of each quantized layer): unsigned per tensor, dx = max_mean/255
    (max_mean = mean over calibration samples of each sample's max), codes
    clamp(round(x/dx), 0, 255), then the variant's window rule on the codes.
  * the layer computes conv(codes_x, codes_w) in float32 and rescales by dx*dw[c], then adds
    the float bias; BN is not folded; pooling, adds, concat stay FP32.
  * calibration: one pass over the calibration set with batch norms in train mode (no weight
    update) that also refreshes their running statistics, then (bn_recalibration) the same
    pass with the quantized model before evaluating; finally a statistics pass in eval mode.
Base "qcard": BN folded first (conv weights absorb the BN), dw = max|w|/127, activation ranges
min-max (or percentile), first/last layers at plain 8-bit, no BN passes (nothing left to refresh).
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from ...errors import QcardError
from ...records import LayerRecord
from ..base import Method, QuantResult
from . import blocks, card, work
from .bn_fold import fold_batch_norms
from .cost import cost_comparison
from .kernels import SparqKernel
from .layers import SparqLayerMixin, swap_in
from .params import PLAIN_BITS, WINDOW_VARIANTS, SparqError, SparqParams
from .passes import batch_norms, bn_train, images, run_batches
from .select import Selection, select_layers


class _Run:
    """One application of SPARQ to one model: the steps of SPARQ.apply and what they leave behind."""

    def __init__(self, model: nn.Module, data, p: SparqParams, ctx):
        self.model, self.data, self.p, self.ctx = model, data, p, ctx
        self.device = ctx.device
        self.pipeline: List[str] = []
        self.warnings: List[str] = []
        self.negatives: Dict[str, float] = {}
        self.roles: Dict[str, str] = {}
        self.overrides: List[Dict[str, Any]] = []
        self.excluded: List[Dict[str, Any]] = []
        self.folded: List[Tuple[str, str]] = []
        self.layers: Dict[str, SparqLayerMixin] = {}

    # 1. layers, in execution order (names = module paths, as the cost tracer names them)
    def select(self) -> Selection:
        from ...cost import trace_layers
        self.traced = trace_layers(self.model, tuple(self.data.input_shape), device=self.device)
        self.sel = select_layers(self.model, self.traced, self.p)
        self.pipeline.append(f"layers: {len(self.sel.candidates)} SPARQ-candidate conv/linear layer(s), first/last "
                             f"layer {'FP32' if self.p.first_last == 'fp32' else 'plain 8-bit'}")
        self.cal = self.data.calibration_set()
        self.loader = self.data.loader(self.cal, batch_size=self.p.calibration_batch_size)
        self.has_bn = self.had_bn = bool(batch_norms(self.model))
        return self.sel

    # 2. base qcard: fold batch norms first
    def fold(self) -> None:
        if not (self.p.base == "qcard" and self.has_bn):
            return
        example = images(next(iter(self.loader)))[:2].to(self.device)
        self.folded = fold_batch_norms(self.model, example)
        self.pipeline.append(f"fold batch norm ({len(self.folded)} folded)")
        self.has_bn = bool(batch_norms(self.model))
        if self.has_bn:
            self.warnings.append(f"{len(batch_norms(self.model))} batch norm(s) could not be folded and stay FP32")

    def _check_negatives(self) -> None:
        bad = {n: self.layers[n].observer.min for n in self.sel.candidates if self.layers[n].observer.min < 0}
        if bad and self.p.negatives == "error":
            listing = ", ".join(f"'{n}' (min {v:.4g})" for n, v in bad.items())
            raise SparqError(
                f"sparq: negative activations at the input of layer(s) {listing}: SPARQ needs unsigned "
                f"8-bit activations (inputs that come from a ReLU), and the reference code raises here. "
                f"Set the method parameter negatives: exclude to run such layers at plain signed 8-bit "
                f"(recorded on the card), or base/first_last to change which layers are quantized")
        self.negatives.update(bad)

    # 3. swap in the SPARQ layers, observe ranges on the calibration set
    def calibrate(self) -> None:
        p, model = self.p, self.model
        pct = p.percentile if p.activation_range == "percentile" else None
        for name in self.sel.candidates + self.sel.edge:
            self.layers[name] = swap_in(model, name, model.get_submodule(name), pct)
        for lay in self.layers.values():
            lay.sparq_state = "observe"
        self.bn_mode = p.base == "paper" and self.has_bn
        if self.bn_mode:
            with bn_train(model, p.bn_stats):
                self.n_cal = run_batches(model, self.loader, self.device, self.ctx.progress, "sparq calibrate", True,
                                         self._check_negatives)
            self.pipeline.append(f"calibrate activation ranges ({p.activation_range}) on {self.n_cal} training "
                                 f"images, batch norms in train mode (running statistics refreshed, {p.bn_stats})")
        else:
            model.eval()
            self.n_cal = run_batches(model, self.loader, self.device, self.ctx.progress, "sparq calibrate", False,
                                     self._check_negatives)
            self.pipeline.append(f"calibrate activation ranges ({p.activation_range}) on {self.n_cal} training "
                                 f"images (eval mode)")
        self._check_negatives()

    def _role(self, name: str, lay: SparqLayerMixin, window_role: str) -> str:
        if name in self.sel.edge:
            return "s8" if lay.observer.min < 0 else "u8"
        if name not in self.negatives:
            return window_role
        reason = f"negative inputs (min {self.negatives[name]:.4g}); SPARQ off, plain signed 8-bit per tensor"
        self.excluded.append({"name": name, "reason": reason, "min_input": self.negatives[name]})
        self.overrides.append({"name": name, "activations": "8-bit signed per tensor (SPARQ off)", "reason": reason})
        self.ctx.log(f"sparq: layer {name} left at plain signed 8-bit: {reason}")
        self.warnings.append(f"layer {name} runs at plain signed 8-bit (negative inputs, negatives: exclude)")
        return "s8"

    # 4. convert: roles, scales, cached weight codes
    def convert(self) -> None:
        p = self.p
        divisor = 255.0 / 2.0 if p.base == "paper" else 127.0
        window_role = p.variant if p.variant in WINDOW_VARIANTS else ("u8" if p.variant == "a8" else "plain")
        for name, lay in self.layers.items():
            role = self._role(name, lay, window_role)
            r = lay.observer.range(p.activation_range, role == "s8")
            if not r > 0:
                self.warnings.append(f"layer {name} saw no positive input during calibration; its inputs quantize to 0")
                r = torch.finfo(torch.float32).tiny * 255
            dx = r / (127.0 if role == "s8" else 255.0)
            kernel = None
            if role in WINDOW_VARIANTS:
                kernel = SparqKernel(role, p.bits, p.options if role != "vsparq" else None, p.rounding, lay.channel_dim)
            lay.sparq_convert(role, dx, divisor, kernel, PLAIN_BITS.get(p.variant, 8))
            lay.to(self.device)
            lay.sparq_state = "quant"
            self.roles[name] = role
        self.pipeline.append(f"quantize weights: per output channel, symmetric, dw = "
                             f"{'2*max|w|/255' if p.base == 'paper' else 'max|w|/127'} (codes cached)")
        self.pipeline.append(f"quantize activations: {blocks.act_words(p)}")

    # 5. BN recalibration with SPARQ on (paper base)
    def recalibrate(self) -> None:
        p = self.p
        if self.bn_mode and p.bn_recalibration:
            with bn_train(self.model, p.bn_stats):
                n_re = run_batches(self.model, self.loader, self.device, self.ctx.progress, "sparq BN recalibration",
                                   True)
            self.pipeline.append(f"BN recalibration with {p.variant} on ({n_re} training images, {p.bn_stats})")
        elif p.base == "paper" and p.bn_recalibration:
            self.pipeline.append("BN recalibration skipped: the model has no batch norm")
        self.model.eval()

    # 6. statistics pass: eval mode, on the first stats_size calibration images
    def measure(self) -> None:
        self.n_stats = min(self.p.stats_size, len(self.cal))
        stats_set = torch.utils.data.Subset(self.cal, range(self.n_stats))
        for lay in self.layers.values():
            lay.set_collect_stats(True)
        try:
            run_batches(self.model, self.data.loader(stats_set, batch_size=self.p.calibration_batch_size),
                        self.device, self.ctx.progress, "sparq statistics")
        finally:
            for lay in self.layers.values():
                lay.set_collect_stats(False)         # off for the runner's evaluation (speed)
        self.pipeline.append(f"statistics pass: {self.n_stats} calibration images, eval mode")
        self.per_layer = {name: lay.layer_stats() for name, lay in self.layers.items()}

    # 7. records for the cost model
    def records(self) -> List[LayerRecord]:
        records: List[LayerRecord] = []
        op_of = {r.name: r.op for r in self.traced}
        for name, lay in self.layers.items():
            role, st = self.roles[name], self.per_layer[name]
            dist = None
            if role in WINDOW_VARIANTS and st["bits_distribution"]:
                dist = {float(b): float(f) for b, f in st["bits_distribution"].items()}
            records.append(LayerRecord(
                name=name, op=op_of[name], weight_bits=8, activation_bits=lay.plain_bits if role == "plain" else 8,
                weight_granularity="per_channel", weight_symmetric=True, activation_granularity="per_tensor",
                activation_symmetric=role == "s8", activation_bits_distribution=dist, quantized=True,
                extra={"sparq_role": role, "sparq": role in WINDOW_VARIANTS, "dx": lay.dx}))
        for u in self.sel.unquantized:
            records.append(LayerRecord(name=u["name"], op=u["op"], weight_bits=None, activation_bits=None,
                                       quantized=False, reason=u["reason"]))
        return records

    def comparison(self, records: List[LayerRecord]) -> Dict[str, Any]:
        edge = self.sel.edge
        window_layers = {n for n, r in self.roles.items() if r in WINDOW_VARIANTS + ("plain", "u8") and n not in edge}
        try:
            return cost_comparison(self.traced, records, window_layers, self.p.variant)
        except QcardError as exc:                   # the cost model is another module: say so, go on
            self.warnings.append(f"sparq cost comparison failed: {exc}")
            return {"error": str(exc)}

    def result(self) -> QuantResult:
        records = self.records()
        comparison = self.comparison(records)
        p, sel = self.p, self.sel
        stats = blocks.stats_block(p, self.per_layer, self.roles, self.excluded, comparison, self.n_cal, self.n_stats,
                                 self.folded, sel.edge)
        quantization = blocks.quantization_block(p, self.traced, sel.first, sel.last, sel.edge, self.roles,
                                               sel.unquantized, self.overrides, self.per_layer, self.has_bn,
                                               self.had_bn)
        calibration = {"split": "train", "size": len(self.cal), "seed": self.data.calibration_seed,
                       "labels_used": False}
        return QuantResult(model=self.model, quantization=quantization, layers=records, stats={"sparq": stats},
                           pipeline=self.pipeline, calibration=calibration, warnings=self.warnings)


class SPARQ(Method):
    """Sparsity-aware post-training activation quantization (Shomron et al., NeurIPS 2021)."""
    name = "sparq"
    family = "sparsity_aware_ptq"
    Params = SparqParams
    planned_work = staticmethod(work.planned_work)     # `qcard run --dry-run` (qcard.methods.work)

    def apply(self, model: nn.Module, data, params: SparqParams, ctx) -> QuantResult:
        model.eval()
        run = _Run(model, data, params, ctx)
        run.select()
        run.fold()
        run.calibrate()
        run.convert()
        run.recalibrate()
        run.measure()
        return run.result()

    def card_sections(self, stats: Dict[str, Any]) -> List[Dict[str, Any]]:
        return card.card_sections(stats)
