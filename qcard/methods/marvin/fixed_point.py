"""The simulated layers, by composition: a FixedPointState attached to a conv/linear/BN/avg-pool
module (as `module.fixed_point`) and two forward hooks that quantize its input, parameters and output.

The module keeps its own class; nothing is written into module globals. The random source for
stochastic rounding belongs to the training run (a RoundingSource shared by its layers) and is
dropped when the run ends or fails.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

ATTR = "fixed_point"          # the module attribute that holds a layer's FixedPointState


@dataclass
class RoundingSource:
    """The training run's generator for stochastic rounding (None outside training)."""
    generator: Any = None


@dataclass
class FixedPointState:
    """A layer's format <wl, fl>, its quantized parameter copies (empty once the model is frozen),
    the rounding at inference, and whether its input is already on its grid (the untouched output
    of a layer with the same format)."""
    wl: int
    fl: int
    eval_rounding: str = "nearest"
    skip_input: bool = False
    source: Optional[RoundingSource] = None
    q: Dict[str, Any] = field(default_factory=dict)
    saved: Dict[str, Any] = field(default_factory=dict)      # masters while the copies stand in

    def _rounding(self, training: bool):
        gen = self.source.generator if (training and self.source is not None) else None
        return ("stochastic" if training else self.eval_rounding), gen

    def before_forward(self, module, args):
        """Quantize the input; put the quantized copies in place of the parameters. The gradient
        reaches the FP32 masters straight through (master + (copy - master).detach())."""
        from ...quant.fixed_point import fixed_point_quantize
        if self.q:
            for name, q in self.q.items():
                master = module._parameters[name]
                self.saved[name] = master
                module._parameters[name] = master + (q - master).detach() if master.requires_grad else q
        if self.skip_input or not args:
            return None
        rounding, gen = self._rounding(module.training)
        return (fixed_point_quantize(args[0], self.wl, self.fl, rounding=rounding, generator=gen),) + tuple(args[1:])

    def after_forward(self, module, args, out):
        from ...quant.fixed_point import fixed_point_quantize
        self.restore(module)
        rounding, gen = self._rounding(module.training)
        return fixed_point_quantize(out, self.wl, self.fl, rounding=rounding, generator=gen)

    def restore(self, module) -> None:
        """The FP32 masters back in place (also after a forward pass that raised)."""
        if self.saved:
            module._parameters.update(self.saved)
            self.saved = {}


def attach(module, state: FixedPointState) -> FixedPointState:
    """Make `module` a fixed-point layer: its state as module.fixed_point, its hooks registered."""
    setattr(module, ATTR, state)
    module.register_forward_pre_hook(state.before_forward)
    module.register_forward_hook(state.after_forward)
    return state


def state_of(module) -> Optional[FixedPointState]:
    return getattr(module, ATTR, None)


def kind(module) -> Optional[str]:
    """'owner' (conv/linear with a weight matrix: has its own format), 'attached' (BN, average
    pooling: uses the format of the layer that ran before it) or None."""
    from torch import nn
    if state_of(module) is not None:
        return None
    if isinstance(module, nn.modules.conv._ConvNd) or isinstance(module, nn.Linear):
        return "owner" if module.weight is not None and module.weight.dim() > 1 else None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "attached"
    if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                           nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        return "attached"
    return None
