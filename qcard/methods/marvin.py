"""MARViN / AdaPT: adaptive per-layer fixed-point precision during training (shared/specs/marvin.md).

Kummer, Sidak, Reichmann, Gansterer: "MARViN" (arXiv 2107.13490, 2021), extended as "AdaPT: Adaptive
Precision Training" (SDM 2023); rules read from the authors' code (lorenz0890/AdaPT).

Simulation. Every conv and linear layer (all of them, first and last included) owns a fixed-point
format <wl, fl> (start <8, 4>). Batch norm and average pooling use the format of the conv/linear
layer that ran just before them in the forward pass (as the reference, whose 1-D parameters copy the
preceding weight's format). Each of these layers quantizes its input and its output; its weight (and
bias, and BN's affine parameters) is a stochastically rounded copy of the FP32 master weights, redrawn
after every optimizer step; gradients reach the masters straight through.

Each optimizer step, per conv/linear weight (after the gradients of all accumulated mini-batches):
    g = fixed_point_stochastic(grad, wl, fl);  g = g / ||g||          (every parameter tensor)
    k += 1;  S += g;  GD = k / ||S||                                   (gradient diversity)
    lb = ceil(m · clip(MAX_LB / GD, MIN_LB, MAX_LB) + (1 − m) · lb)
    res ± 1 when lb hits MAX_LB / MIN_LB
    if k >= lb:  <wl, fl> = PUSH_UP(GD, PUSH_DOWN(W, wl, fl, res));  k, S = 0
then SGD updates the masters and the copies are redrawn with the new formats.

Choices (spec "(choice)" items): push-down uses a true ε-smoothed KL divergence between res-bin
histograms of the whole FP32 tensor and its nearest-rounded copy (copy clamped into [min W, max W] so
rounding at the edges stays in the edge bins), "no information lost" = KL <= τ, and a correct
bisection (smallest fl in [FL_FLOOR, fl], then smallest wl in [fl, wl], assuming a larger format never
loses more). kl_mode="reference" reproduces the authors' code instead: its loss
kl_div(P, Q, reduction="batchmean", log_target=True) of the normalized histograms (probabilities
passed as log-probabilities), stochastic rounding in the test, histograms of the first output filter
only, "lost" iff loss > 0, and its bisections (the fl search always tests the lower bound; the wl
search returns the lower bound).

The push-up strategy escalates min → mean → max while the step loss is not below the mean of the
previous ⌊mean lb⌋ step losses and returns to min otherwise (the reference divides a window of
⌊mean lb⌋ + 1 losses by ⌊mean lb⌋; this mean is a plain one).

Cost (bit-width-weighted multiply-accumulates; standard MACs of conv/linear layers from
qcard.cost.trace, batch 1). The reference's analytics (utils/analytics.py) count every conv twice,
use their own "madds" formula (about 2 per MAC) and also charge batch norm and pooling; that changes
how layers are weighted against each other, not the figures of a uniform precision:
    training speedup  = 2·ΣF / (ΣQ + ΣF), summed over training steps (forward charged at the word
                        lengths and weight density used in that step, backward at float32);
                        switching overhead is not charged
    inference speedup = Σ 32·MACs / Σ nz·MACs·wl   (final state; nz = 1 − weight sparsity)
    model size ratio  = Σ wl·params·nz / Σ 32·params (conv/linear weight + bias elements)
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple

from pydantic import Field, model_validator

from ..training import TrainRecipe, train
from .base import Method, MethodParams, QuantResult

STRATEGIES = ("min", "mean", "max")
_UNQUANTIZED_OPS = ("matmul", "attention", "layernorm", "softmax", "concat")


# ============================================================================ pure rules

def gradient_diversity(k: int, sum_norm: float) -> float:
    """k unit-norm gradients whose sum has norm sum_norm: k / ||Σg|| (>= 1; inf when the sum is 0)."""
    if k <= 0:
        return float("nan")
    return float(k) / sum_norm if sum_norm > 0 else float("inf")


def _ceil(x: float) -> int:
    return int(math.ceil(round(x, 9)))    # 0.33·100 + 0.67·100 must give 100, not 101


def update_lookback(lb: int, gd: float, min_lb: int, max_lb: int, momentum: float) -> int:
    target = min_lb if not (gd > 0) or math.isinf(gd) else min(max(max_lb / gd, min_lb), max_lb)
    return int(min(max(_ceil(momentum * target + (1.0 - momentum) * lb), min_lb), max_lb))


def update_resolution(res: int, lb: int, min_lb: int, max_lb: int, min_res: int, max_res: int) -> int:
    if lb == max_lb:
        res = min(res + 1, max_res)
    if lb == min_lb:
        res = max(res - 1, min_res)
    return int(res)


def push_up_step(gd: float, fl: int, strategy: str, cap: int = 32) -> int:
    """How many fractional bits push-up adds (s); 1 when GD <= e or GD is not finite."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown push-up strategy '{strategy}'; allowed: {', '.join(STRATEGIES)}")
    s = 1
    if 0 < gd < float("inf"):
        L = math.log(gd) - 1.0
        if L > 0:
            L2 = L * L
            s1 = max(_ceil(min(1.0 / L2, 1e9)), 1)
            s2 = max(min(_ceil(cap * L2), cap) - fl, 0)
            if strategy == "min":
                s = min(s1, s2)
            elif strategy == "mean":
                s = _ceil(0.5 * (s1 + s2))
            else:
                s = max(s1, s2)
    return int(s)


def push_up(gd: float, wl: int, fl: int, strategy: str, results_buffer: int, cap: int = 32) -> Tuple[int, int]:
    """PUSH_UP: more fractional bits when gradients are diverse, then keep RB bits of headroom."""
    s = push_up_step(gd, fl, strategy, cap)
    fl = min(fl + s, cap)
    wl = min(max(wl, fl) + 1, cap)
    fl = min(fl, cap - results_buffer)
    wl = max(min(fl + results_buffer, cap), wl)
    return int(wl), int(fl)


def smallest_passing(lo: int, hi: int, lost: Callable[[int], bool]) -> int:
    """Smallest v in [lo, hi] with not lost(v), by bisection, taking hi as acceptable (the current
    format) and assuming monotonicity (if v passes, every larger v passes). Never evaluates hi."""
    if hi <= lo:
        return hi
    while lo < hi:
        mid = (lo + hi) // 2
        if lost(mid):
            lo = mid + 1
        else:
            hi = mid
    return hi


def push_down(wl: int, fl: int, lost: Callable[[int, int], bool], fl_floor: int = 4) -> Tuple[int, int]:
    """PUSH_DOWN (correct bisection): smallest fl in [fl_floor, fl] with no loss at word length wl,
    then smallest wl in [fl', wl] with no loss at fl'. lost(wl, fl) -> True when information is lost."""
    new_fl = smallest_passing(min(fl_floor, fl), fl, lambda f: lost(wl, f))
    new_wl = smallest_passing(min(new_fl, wl), wl, lambda w: lost(w, new_fl))
    return int(new_wl), int(new_fl)


def push_down_reference(wl: int, fl: int, lost: Callable[[int, int], bool], fl_floor: int = 4) -> Tuple[int, int]:
    """PUSH_DOWN as the authors' code does it (its bisections, including their slips)."""
    fl_min, fl_max = fl_floor, fl
    for _ in range(fl_max - fl_min):
        mid = _ceil((fl_max + fl_min) / 2)
        if lost(wl, fl_min):          # the code tests fl_min, not the midpoint
            fl_min = mid
        else:
            fl_max = mid
        if fl_max - fl_min <= 1:
            break
    wl_min, wl_max = fl_min, wl
    for _ in range(wl_max - wl_min):
        mid = _ceil((wl_max + wl_min) / 2)
        if lost(mid, fl_min):
            wl_min = mid
        else:
            wl_max = mid
        if wl_max - wl_min <= 1:
            break
    return int(wl_min), int(fl_min)       # the code returns the lower bound of the wl search


def kl_histograms(w, q, resolution: int, eps: float = 1e-10) -> float:
    """KL(P‖Q) of `resolution`-bin histograms over [min w, max w]; q is clamped into that range;
    both histograms are normalized and ε-smoothed. 0 for a constant tensor."""
    import torch
    w = w.detach().float().reshape(-1)
    lo, hi = float(w.min()), float(w.max())
    if not hi > lo:
        return 0.0
    p = torch.histc(w, bins=int(resolution), min=lo, max=hi)
    qh = torch.histc(q.detach().float().reshape(-1).clamp(lo, hi), bins=int(resolution), min=lo, max=hi)
    p = p / p.sum() + eps
    qh = qh / qh.sum() + eps
    p, qh = p / p.sum(), qh / qh.sum()
    return float((p * (p / qh).log()).sum())


def reference_kl_loss(w, q, resolution: int) -> float:
    """The reference code's push-down loss: kl_div(P, Q, 'batchmean', log_target=True) of histograms
    P (of w over its own range) and Q (of q over w's range, values outside dropped), normalized."""
    import torch
    import torch.nn.functional as F
    w = w.detach().float().reshape(-1)
    p = torch.histc(w, bins=int(resolution))
    qh = torch.histc(q.detach().float().reshape(-1), bins=int(resolution), min=float(w.min()), max=float(w.max()))
    p, qh = p / p.sum(), qh / qh.sum()
    return float(F.kl_div(p, qh, reduction="batchmean", log_target=True))


def make_lost_test(w, resolution: int, *, mode: str = "true", tau: float = 1e-6, eps: float = 1e-10,
                   generator=None) -> Callable[[int, int], bool]:
    """lost(wl, fl) for one weight tensor (whole tensor in 'true' mode, first output filter in 'reference')."""
    from ..quant.fixed_point import fixed_point_quantize
    w = w.detach()
    if mode == "true":
        def lost(wl: int, fl: int) -> bool:
            q = fixed_point_quantize(w, wl, fl, rounding="nearest")
            return kl_histograms(w, q, resolution, eps) > tau
    elif mode == "reference":
        w0 = w[0] if w.dim() > 1 else w

        def lost(wl: int, fl: int) -> bool:
            q = fixed_point_quantize(w0, wl, fl, rounding="stochastic", generator=generator)
            return reference_kl_loss(w0, q, resolution) > 0      # NaN (empty Q) counts as no loss, as there
    else:
        raise ValueError(f"unknown kl_mode '{mode}'; allowed: true, reference")
    return lost


class StrategySchedule:
    """Push-up strategy: escalate min → mean → max while the loss does not improve on the mean of
    the last `window` step losses, back to min when it does."""

    def __init__(self, start: str = "min", adaptive: bool = True, keep: int = 1000):
        if start not in STRATEGIES:
            raise ValueError(f"unknown push-up strategy '{start}'; allowed: {', '.join(STRATEGIES)}")
        self.strategy, self.adaptive, self.keep = start, adaptive, keep
        self.history: List[float] = []

    def update(self, loss: float, window: int) -> str:
        window = max(1, int(window))
        if self.adaptive and len(self.history) >= window:
            recent = sum(self.history[-window:]) / window
            if not (loss < recent):                 # no improvement (NaN included)
                self.strategy = STRATEGIES[min(STRATEGIES.index(self.strategy) + 1, 2)]
            else:
                self.strategy = "min"
        self.history.append(float(loss))
        if len(self.history) > self.keep:
            del self.history[: len(self.history) - self.keep]
        return self.strategy


def marvin_cost(layers: List[Dict[str, float]]) -> Dict[str, Optional[float]]:
    """Inference speedup and model size ratio of a final state.
    layers: [{macs, params, wl, sparsity}] (sparsity = fraction of exact-zero weights)."""
    f = sum(32.0 * l["macs"] for l in layers)
    q = sum((1.0 - l.get("sparsity", 0.0)) * l["macs"] * l["wl"] for l in layers)
    size_q = sum(l["wl"] * l["params"] * (1.0 - l.get("sparsity", 0.0)) for l in layers)
    size_f = sum(32.0 * l["params"] for l in layers)
    return {"inference_speedup": f / q if q > 0 else None,
            "model_size_ratio": size_q / size_f if size_f > 0 else None}


def training_speedup(sum_q: float, sum_f: float) -> Optional[float]:
    """2·ΣF / (ΣQ + ΣF): forward at the quantized cost, backward at float32."""
    return 2.0 * sum_f / (sum_q + sum_f) if sum_f > 0 else None


# ============================================================================ the simulated layers

_ACTIVE = {"generator": None}        # the training run's generator for stochastic rounding


class _FixedPointLayer:
    """Mixed into a copy of a conv/linear/BN/avg-pool class: quantize input, parameters and output.

    Attributes: _mv_wl, _mv_fl (the layer's format), _mv_q (name -> quantized copy of a parameter,
    empty once the model is frozen), _mv_eval_rounding, _mv_skip_input (the input is always the
    untouched output of a layer with the same format, hence already on the grid)."""

    def forward(self, x, *args, **kwargs):
        from ..quant.fixed_point import fixed_point_quantize
        wl, fl = self._mv_wl, self._mv_fl
        rounding = "stochastic" if self.training else self._mv_eval_rounding
        gen = _ACTIVE["generator"] if self.training else None
        if not self._mv_skip_input:
            x = fixed_point_quantize(x, wl, fl, rounding=rounding, generator=gen)
        if self._mv_q:
            with _swap_parameters(self, self._mv_q):
                out = super().forward(x, *args, **kwargs)
        else:
            out = super().forward(x, *args, **kwargs)
        return fixed_point_quantize(out, wl, fl, rounding=rounding, generator=gen)


@contextmanager
def _swap_parameters(module, qcopies: Dict[str, Any]):
    """Run the module's own forward with quantized copies in place of its parameters; the gradient
    reaches the FP32 masters straight through (master + (copy − master).detach())."""
    saved = {}
    try:
        for name, q in qcopies.items():
            master = module._parameters[name]
            saved[name] = master
            module._parameters[name] = master + (q - master).detach() if master.requires_grad else q
        yield
    finally:
        module._parameters.update(saved)


_CLASSES: Dict[type, type] = {}


def _fixed_point_class(cls: type) -> type:
    if cls not in _CLASSES:
        name = f"Marvin{cls.__name__}"
        while name in globals():
            name += "_"
        new = type(name, (_FixedPointLayer, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = new          # importable by name, so the model pickles
        _CLASSES[cls] = new
    return _CLASSES[cls]


def _kind(module) -> Optional[str]:
    from torch import nn
    if isinstance(module, _FixedPointLayer):
        return None
    if isinstance(module, nn.modules.conv._ConvNd) or isinstance(module, nn.Linear):
        return "owner" if module.weight is not None and module.weight.dim() > 1 else None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "attached"
    if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                           nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        return "attached"
    return None


# ============================================================================ per-layer state

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


# ============================================================================ the method

class Marvin(Method):
    name = "marvin"
    family = "adaptive_precision_training"

    class Params(MethodParams):
        train: TrainRecipe = Field(default_factory=TrainRecipe, description="the training recipe")
        initial_wl: int = Field(8, ge=2, le=32, description="starting word length of every layer (sign included)")
        initial_fl: int = Field(4, ge=0, le=31, description="starting fractional length of every layer")
        max_lookback: int = Field(100, ge=1, description="MAX_LOOKBACK")
        min_lookback: int = Field(10, ge=1, description="MIN_LOOKBACK")
        max_resolution: int = Field(100, ge=1, description="MAX_RESOLUTION (histogram bins)")
        min_resolution: int = Field(1, ge=1, description="MIN_RESOLUTION (histogram bins)")
        lookback_momentum: float = Field(0.33, ge=0, le=1, description="LOOKBACK_MOMENTUM")
        results_buffer: int = Field(8, ge=0, le=31, description="RESULTS_BUFFER: integer bits kept above fl")
        strategy: Literal["min", "mean", "max"] = Field("min", description="initial push-up strategy")
        adapt_strategy: bool = Field(True, description="escalate min → mean → max while the loss does not improve")
        wl_cap: int = Field(32, ge=2, le=32, description="word-length cap")
        fl_floor: int = Field(4, ge=0, le=31, description="lowest fl push-down may choose")
        kl_mode: Literal["true", "reference"] = Field("true", description="push-down test: true KL or the reference code's")
        kl_threshold: float = Field(1e-6, ge=0, description="τ: KL <= τ means no information lost (true mode)")
        kl_epsilon: float = Field(1e-10, gt=0, description="ε added to histogram probabilities (true mode)")
        quantize_grads: bool = Field(True, description="round gradients onto the layer's <wl, fl> (stochastic)")
        unit_norm_grads: bool = Field(True, description="divide every gradient tensor by its L2 norm (reference optimizer)")
        eval_rounding: Literal["nearest", "stochastic"] = Field(
            "nearest", description="activation rounding of the delivered model at inference")
        target_accuracy: Optional[float] = Field(
            None, gt=0, le=100, description="for the iso-accuracy speedup (needs train.eval_every_epoch)")

        @model_validator(mode="after")
        def _check(self):
            if self.min_lookback > self.max_lookback:
                raise ValueError(f"min_lookback ({self.min_lookback}) must not exceed max_lookback ({self.max_lookback})")
            if self.min_resolution > self.max_resolution:
                raise ValueError(f"min_resolution ({self.min_resolution}) must not exceed max_resolution "
                                 f"({self.max_resolution})")
            if self.initial_fl > self.initial_wl:
                raise ValueError(f"initial_fl ({self.initial_fl}) must not exceed initial_wl ({self.initial_wl})")
            if self.initial_wl > self.wl_cap:
                raise ValueError(f"initial_wl ({self.initial_wl}) exceeds wl_cap ({self.wl_cap})")
            if self.results_buffer >= self.wl_cap:
                raise ValueError(f"results_buffer ({self.results_buffer}) must be below wl_cap ({self.wl_cap})")
            if self.target_accuracy is not None and not self.train.eval_every_epoch:
                raise ValueError("target_accuracy needs train.eval_every_epoch: true (the iso-accuracy speedup "
                                 "reads the per-epoch eval accuracy)")
            return self

    def apply(self, model, data, params, ctx) -> QuantResult:
        controller = MarvinController(model, data, params, ctx)
        log = train(model, data, params.train, ctx, hooks=[controller])
        return controller.result(log)


class MarvinController:
    """Converts the model, then runs the switching loop as hooks of the shared training loop."""

    def __init__(self, model, data, params, ctx):
        import torch
        self.model, self.data, self.p, self.ctx = model, data, params, ctx
        self.warnings: List[str] = []
        self.trace = self._trace(model, data)
        self.owners, self.attached_to = self._convert(model)
        self.schedule = StrategySchedule(params.strategy, params.adapt_strategy)
        self.strategy_steps = {s: 0 for s in STRATEGIES}
        self.switches: List[Dict[str, Any]] = []
        self.sum_q = self.sum_f = 0.0
        self.generator = None
        self.param_owner: Dict[int, LayerState] = {}
        for st in self.owners.values():
            for p in st.module.parameters(recurse=False):
                self.param_owner[id(p)] = st
        for mname, owner in self.attached_to.items():
            module = self.model.get_submodule(mname)
            for p in module.parameters(recurse=False):
                self.param_owner[id(p)] = self.owners[owner]
        self._torch = torch

    # -- setup ------------------------------------------------------------------------------
    def _trace(self, model, data):
        from ..cost import trace_layers
        try:
            device = str(next(model.parameters()).device)
            return {r.name: r for r in trace_layers(model, tuple(data.input_shape), device=device)}
        except Exception as exc:    # cost figures then lack MACs; say so instead of failing the run
            msg = f"marvin: could not trace the model for MAC counts ({exc}); speedups are not computed"
            self.warnings.append(msg)
            self.ctx.log(msg)
            return {}

    def _convert(self, model):
        import torch
        from torch import nn
        p = self.p
        inside_mha = set()
        for mname, m in model.named_modules():
            if isinstance(m, nn.MultiheadAttention):
                inside_mha.update(f"{mname}.{c}" if mname else c for c, _ in m.named_modules() if c)
        candidates = {n: m for n, m in model.named_modules() if _kind(m) and n not in inside_mha}
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
                model(torch.zeros((1, *tuple(self.data.input_shape)), device=dev))
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        seen, ordered = set(), []
        for n in order:
            if n not in seen:
                seen.add(n)
                ordered.append(n)
        self.not_executed = [n for n in candidates if n not in seen]
        owners: Dict[str, LayerState] = {}
        attached_to: Dict[str, str] = {}
        pending: List[str] = []
        current = None
        for n in ordered:
            m = candidates[n]
            if _kind(m) == "owner":
                rec = self.trace.get(n)
                st = LayerState(name=n, module=m, wl=p.initial_wl, fl=p.initial_fl, lookback=p.min_lookback,
                                resolution=p.min_resolution,
                                macs=int(rec.macs) if rec else 0,
                                params=int(rec.params) if rec else sum(t.numel() for t in m.parameters(recurse=False)),
                                act_elems=int(math.prod(rec.input_shape)) if rec and rec.input_shape else 0,
                                op=rec.op if rec else ("linear" if isinstance(m, nn.Linear) else "conv2d"),
                                trace_extra=dict(rec.extra) if rec else {})
                owners[n] = st
                current = st
                for a in pending:            # layers that ran before any conv/linear: the first one
                    attached_to[a] = n
                    st.attached.append(a)
                pending = []
            elif current is None:
                pending.append(n)
            else:
                attached_to[n] = current.name
                current.attached.append(n)
        if not owners:
            raise ValueError("marvin needs at least one conv or linear layer that runs in the forward pass; "
                             "this model has none")
        group = {n: attached_to.get(n, n) for n in ordered}
        for n in ordered:
            m = candidates[n]
            m.__class__ = _fixed_point_class(type(m))
            st = owners.get(n) or owners[attached_to[n]]
            m._mv_wl, m._mv_fl, m._mv_q = st.wl, st.fl, {}
            m._mv_eval_rounding = self.p.eval_rounding
            # an input that is, untouched, the output of a layer with the same format is already on
            # the grid: quantizing it again changes nothing (e.g. BN after its conv), so skip the work
            src = produced.get(inputs.get(n, (None, None)))
            m._mv_skip_input = src is not None and src != n and group.get(src) == group[n]
        return owners, attached_to

    def _modules_of(self, st: LayerState):
        yield st.module
        for a in st.attached:
            yield self.model.get_submodule(a)

    def _requantize(self) -> None:
        """Redraw every layer's quantized parameter copies with its current format; update sparsity."""
        from ..quant.fixed_point import fixed_point_quantize
        with self._torch.no_grad():
            for st in self.owners.values():
                for m in self._modules_of(st):
                    m._mv_wl, m._mv_fl = st.wl, st.fl
                    m._mv_q = {n: fixed_point_quantize(t.detach(), st.wl, st.fl, rounding="stochastic",
                                                       generator=self.generator)
                               for n, t in m._parameters.items() if t is not None}
                qw = st.module._mv_q["weight"]
                st.sparsity = float((qw == 0).sum()) / max(1, qw.numel())

    # -- hooks --------------------------------------------------------------------------------
    def on_train_start(self, state) -> None:
        torch = self._torch
        dev = next(self.model.parameters()).device
        self.generator = torch.Generator(device=dev).manual_seed(int(self.ctx.seed) * 1000003 + 17)
        _ACTIVE["generator"] = self.generator
        self.batches_per_epoch = state.batches_per_epoch
        for st in self.owners.values():
            st.trajectory.append({"step": 0, "epoch": 1, "epoch_progress": 0.0, "wl": st.wl, "fl": st.fl})
        self._requantize()

    def after_backward(self, state) -> None:
        torch = self._torch
        from ..quant.fixed_point import fixed_point_quantize
        p = self.p
        # 1. cost of this step's forward pass, at the formats and densities it used
        for st in self.owners.values():
            self.sum_q += state.samples * (1.0 - st.sparsity) * st.macs * st.wl
            self.sum_f += state.samples * 32.0 * st.macs
            st.steps_at_wl[st.wl] = st.steps_at_wl.get(st.wl, 0) + 1
        # 2. push-up strategy from the step loss
        mean_lb = sum(st.lookback for st in self.owners.values()) / len(self.owners)
        strategy = self.schedule.update(state.loss, math.floor(mean_lb))
        self.strategy_steps[strategy] += 1
        # 3. quantize and normalize every gradient tensor (masters are updated with these)
        with torch.no_grad():
            for param in self.model.parameters():
                if param.grad is None:
                    continue
                st = self.param_owner.get(id(param))
                g = param.grad
                if p.quantize_grads and st is not None:
                    g = fixed_point_quantize(g, st.wl, st.fl, rounding="stochastic", generator=self.generator)
                if p.unit_norm_grads:
                    n = g.norm()
                    if n > 0:
                        g = g / n
                param.grad.copy_(g)
        # 4. gradient diversity, lookback, resolution and switching per conv/linear weight
        for st in self.owners.values():
            w = st.module.weight
            if w.grad is None:
                continue
            g = w.grad.detach()
            if not p.unit_norm_grads:          # GD is defined on unit-norm gradients
                n = g.norm()
                g = g / n if n > 0 else g
            st.k += 1
            st.grad_sum = g.clone() if st.grad_sum is None else st.grad_sum.add_(g)
            gd = gradient_diversity(st.k, float(st.grad_sum.norm()))
            st.lookback = update_lookback(st.lookback, gd, p.min_lookback, p.max_lookback, p.lookback_momentum)
            st.resolution = update_resolution(st.resolution, st.lookback, p.min_lookback, p.max_lookback,
                                              p.min_resolution, p.max_resolution)
            if st.k >= st.lookback:
                self._decide(st, gd, strategy, state)

    def _decide(self, st: LayerState, gd: float, strategy: str, state) -> None:
        p = self.p
        lost = make_lost_test(st.module.weight, st.resolution, mode=p.kl_mode, tau=p.kl_threshold,
                              eps=p.kl_epsilon, generator=self.generator)
        down = push_down_reference if p.kl_mode == "reference" else push_down
        wl, fl = down(st.wl, st.fl, lost, p.fl_floor)
        wl, fl = push_up(gd, wl, fl, strategy, p.results_buffer, p.wl_cap)
        st.k, st.grad_sum = 0, None
        st.decisions += 1
        if (wl, fl) != (st.wl, st.fl):
            intra = state.batch < state.batches_per_epoch
            where = {"step": state.step, "epoch": state.epoch, "epoch_progress": round(state.epoch_progress, 4)}
            self.switches.append({"layer": st.name, **where, "from": [st.wl, st.fl], "to": [wl, fl],
                                  "strategy": strategy, "gradient_diversity": round(gd, 4) if math.isfinite(gd) else None,
                                  "intra_epoch": intra})
            st.trajectory.append({**where, "wl": wl, "fl": fl})
            st.wl, st.fl = wl, fl

    def after_step(self, state) -> None:
        self._requantize()

    def on_train_end(self, state) -> None:
        """Freeze: the delivered model's parameters are the last fixed-point copies."""
        _ACTIVE["generator"] = None
        with self._torch.no_grad():
            for st in self.owners.values():
                for m in self._modules_of(st):
                    for n, q in m._mv_q.items():
                        m._parameters[n].data.copy_(q)
                    m._mv_q = {}

    # -- results ------------------------------------------------------------------------------
    def result(self, log) -> QuantResult:
        from ..records import LayerRecord
        p = self.p
        owners = list(self.owners.values())
        steps = max(1, log.steps)
        final = {st.name: {"wl": st.wl, "fl": st.fl, "sparsity": round(st.sparsity, 6),
                           "lookback": st.lookback, "resolution": st.resolution, "decisions": st.decisions}
                 for st in owners}
        cost = marvin_cost([{"macs": st.macs, "params": st.params, "wl": st.wl, "sparsity": st.sparsity}
                            for st in owners])
        train_su = training_speedup(self.sum_q, self.sum_f)
        iso = None
        if p.target_accuracy is not None and train_su is not None:
            hit = next((r for r in log.curve if r.get("eval_acc") is not None and r["eval_acc"] >= p.target_accuracy),
                       None)
            if hit is not None:
                iso = train_su / (hit["step"] / steps)
        have_macs = all(st.macs > 0 for st in owners)
        stats_marvin = {
            "trajectories": {st.name: st.trajectory for st in owners},
            "switches": self.switches,
            "switch_count": len(self.switches),
            "intra_epoch_switches": sum(1 for s in self.switches if s["intra_epoch"]),
            "final": final,
            "attached_layers": dict(self.attached_to),
            "training_speedup": _r(train_su) if have_macs else None,
            "inference_speedup": _r(cost["inference_speedup"]) if have_macs else None,
            "model_size_ratio": _r(cost["model_size_ratio"]),
            "iso_accuracy_speedup": _r(iso),
            "size_ratio_weighting": "params",
            "macs_counting": "standard MACs (one per multiply-add, batch 1) of conv/linear layers; the reference "
                             "counts every conv twice, uses 2·MACs and also charges BN/pooling",
            "switching_overhead": "not charged",
            "time_weighted_wl": {st.name: {str(b): round(c / steps, 6) for b, c in sorted(st.steps_at_wl.items())}
                                 for st in owners},
            "bits_distribution_note": "per-layer records carry the FINAL word length (inference cost); the "
                                      "time-weighted word-length distribution over training steps is in "
                                      "time_weighted_wl and is not used for the card's cost",
            "strategy_steps": dict(self.strategy_steps),
            "kl_mode": p.kl_mode,
            "eval_rounding": p.eval_rounding,
        }
        layers: List[LayerRecord] = []
        for st in owners:
            extra = dict(st.trace_extra)
            extra.update({"fixed_point": [st.wl, st.fl], "marvin_time_weighted_wl": stats_marvin["time_weighted_wl"][st.name]})
            layers.append(LayerRecord(
                name=st.name, op=st.op, macs=st.macs, params=st.params, weight_bits=st.wl, activation_bits=st.wl,
                output_bits=st.wl, weight_granularity="per_tensor", weight_symmetric=True,
                activation_granularity="per_tensor", activation_symmetric=True,
                weight_sparsity=round(st.sparsity, 6), extra=extra))
            for a in st.attached:
                rec = self.trace.get(a)
                if rec is not None and rec.op == "avgpool":
                    layers.append(LayerRecord(name=a, op="avgpool", activation_bits=st.wl, output_bits=st.wl,
                                              activation_granularity="per_tensor", activation_symmetric=True,
                                              extra=dict(rec.extra)))
        return QuantResult(
            model=self.model,
            quantization=self._quantization_block(owners),
            layers=layers,
            stats={"marvin": stats_marvin, "training": log.to_stats()},
            pipeline=["reinitialize" if p.train.from_scratch else "start_from_given_weights",
                      "convert_fixed_point(<%d,%d>)" % (p.initial_wl, p.initial_fl),
                      "train_adaptive_precision", "freeze_fixed_point_weights"],
            calibration={"split": "train", "size": len(self.data.train), "seed": self.ctx.seed, "labels_used": True},
            warnings=self.warnings + list(log.warnings),
        )

    def _quantization_block(self, owners: List[LayerState]) -> Dict[str, Any]:
        welems = {st.name: st.module.weight.numel() for st in owners}
        mean_w = sum(st.wl * welems[st.name] for st in owners) / sum(welems.values())
        aw = sum(st.act_elems for st in owners)
        mean_a = (sum(st.wl * st.act_elems for st in owners) / aw) if aw else mean_w
        first, last = owners[0], owners[-1]
        ops = {r.op for r in self.trace.values()}
        adds = any(r.op == "add" for r in self.trace.values())
        unq = [{"name": r.name, "op": r.op, "reason": "MARViN quantizes conv, linear, batch norm and average "
                                                       "pooling only; this op runs in float32"}
               for r in self.trace.values() if r.op in _UNQUANTIZED_OPS]
        unq += [{"name": n, "op": type(self.model.get_submodule(n)).__name__.lower(),
                 "reason": "not executed in the forward pass"} for n in self.not_executed]
        unfriendly = ["per-layer arbitrary word lengths (needs bit-serial or bit-scalable hardware)",
                      "word lengths change during training (precision switching in the training loop)",
                      "stochastic rounding of weights, activations and gradients in training (needs a random source)"]
        if self.p.eval_rounding == "stochastic":
            unfriendly.append("stochastic rounding of activations at inference")
        if adds:
            unfriendly.append("residual adds not requantized (inputs on different fixed-point grids)")
        if unq:
            unfriendly.append("some ops left in float32 (see unquantized_layers)")
        mean_w, mean_a = round(mean_w, 4), round(mean_a, 4)
        return {
            "preset": None, "graph_mode": "eager",
            "weights": {"bits": mean_w, "granularity": "per_tensor", "group_size": None, "symmetric": True,
                        "signed": True, "scale_format": "power_of_two", "range_setting": "fixed_point",
                        "rounding": "stochastic", "format": "fixed point <wl, fl> per layer, no scale factor"},
            "activations": {"bits": mean_a, "granularity": "per_tensor", "symmetric": True, "signed": True,
                            "range_setting": "fixed_point", "dynamic": False, "quant_point": "before_activation",
                            "rounding_training": "stochastic", "rounding_inference": self.p.eval_rounding,
                            "where": "input and output of every conv, linear, batch norm and average pooling"},
            "first_layer": {"name": first.name, "weight_bits": first.wl, "activation_bits": first.wl},
            "last_layer": {"name": last.name, "weight_bits": last.wl, "activation_bits": last.wl},
            "batch_norm": "kept" if any(isinstance(self.model.get_submodule(a), self._torch.nn.modules.batchnorm._BatchNorm)
                                        for st in owners for a in st.attached) else "none",
            "residual_add": "gemm_inputs_only" if adds else "not_present",
            "concat": None if "concat" in ops else "not_present",
            "avg_pool": "requantized" if "avgpool" in ops else "not_present",
            "bias_bits": None, "accumulator_bits": None,
            "bias_format": "the layer's <wl, fl>",
            "cross_layer_equalization": {"applied": False, "bias_absorption": False},
            "bias_correction": "none",
            "mixed_precision": {"enabled": True, "granularity": "layer", "allowed_bits": "1..%d" % self.p.wl_cap,
                                "mean_weight_bits": mean_w, "mean_activation_bits": mean_a,
                                "max_activation_map_bits": None,
                                "weighting": "weights: weight elements; activations: input elements of each "
                                             "conv/linear (batch 1)"},
            "overrides": [],
            "unquantized_layers": unq,
            "hardware_unfriendly": unfriendly,
        }


def _r(x: Optional[float], nd: int = 4) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)
