"""The MARViN controller: the switching loop, run as hooks of the shared training loop
(qcard.training.train). Its state lives in the controller and in each layer's FixedPointState;
nothing is left in module globals, also when training fails (close())."""
from __future__ import annotations

import math
from typing import Any, Dict, List

from .convert import convert
from .fixed_point import RoundingSource, state_of
from .rules import (STRATEGIES, StrategySchedule, gradient_diversity, make_lost_test, push_down,
                    push_down_reference, push_up, update_lookback, update_resolution)
from .state import LayerState


class MarvinController:
    """Converts the model, then runs the switching loop as hooks of the shared training loop."""

    def __init__(self, model, data, params, ctx):
        import torch
        self.model, self.data, self.p, self.ctx = model, data, params, ctx
        self._torch = torch
        self.warnings: List[str] = []
        self.trace = self._trace(model, data)
        self.source = RoundingSource()
        self.owners, self.attached_to, self.not_executed = convert(model, params, self.trace, data.input_shape,
                                                                   self.source)
        self.schedule = StrategySchedule(params.strategy, params.adapt_strategy)
        self.strategy_steps = {s: 0 for s in STRATEGIES}
        self.switches: List[Dict[str, Any]] = []
        self.sum_q = self.sum_f = 0.0
        self.param_owner: Dict[int, LayerState] = {}
        for st in self.owners.values():
            for p in st.module.parameters(recurse=False):
                self.param_owner[id(p)] = st
        for mname, owner in self.attached_to.items():
            for p in self.model.get_submodule(mname).parameters(recurse=False):
                self.param_owner[id(p)] = self.owners[owner]

    def _trace(self, model, data):
        from ...cost import trace_layers
        try:
            device = str(next(model.parameters()).device)
            return {r.name: r for r in trace_layers(model, tuple(data.input_shape), device=device)}
        except Exception as exc:    # cost figures then lack MACs; say so instead of failing the run
            msg = f"marvin: could not trace the model for MAC counts ({exc}); speedups are not computed"
            self.warnings.append(msg)
            self.ctx.log(msg)
            return {}

    def modules_of(self, st: LayerState):
        yield st.module
        for a in st.attached:
            yield self.model.get_submodule(a)

    def _requantize(self) -> None:
        """Redraw every layer's quantized parameter copies with its current format; update sparsity."""
        from ...quant.fixed_point import fixed_point_quantize
        with self._torch.no_grad():
            for st in self.owners.values():
                for m in self.modules_of(st):
                    fp = state_of(m)
                    fp.wl, fp.fl = st.wl, st.fl
                    fp.q = {n: fixed_point_quantize(t.detach(), st.wl, st.fl, rounding="stochastic",
                                                    generator=self.source.generator)
                            for n, t in m._parameters.items() if t is not None}
                qw = state_of(st.module).q["weight"]
                st.sparsity = float((qw == 0).sum()) / max(1, qw.numel())

    # -- hooks --------------------------------------------------------------------------------
    def on_train_start(self, state) -> None:
        dev = next(self.model.parameters()).device
        self.source.generator = self._torch.Generator(device=dev).manual_seed(int(self.ctx.seed) * 1000003 + 17)
        self.batches_per_epoch = state.batches_per_epoch
        for st in self.owners.values():
            st.trajectory.append({"step": 0, "epoch": 1, "epoch_progress": 0.0, "wl": st.wl, "fl": st.fl})
        self._requantize()

    def after_backward(self, state) -> None:
        torch = self._torch
        from ...quant.fixed_point import fixed_point_quantize
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
                    g = fixed_point_quantize(g, st.wl, st.fl, rounding="stochastic", generator=self.source.generator)
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
                              eps=p.kl_epsilon, generator=self.source.generator)
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

    # -- checkpoints (qcard.training: a resumed run goes on from here) --------------------------
    _LAYER_FIELDS = ("wl", "fl", "lookback", "resolution", "k", "grad_sum", "sparsity", "trajectory",
                     "steps_at_wl", "decisions")

    def _fixed_point_modules(self):
        return [(n, m) for n, m in self.model.named_modules() if state_of(m) is not None]

    def checkpoint_state(self) -> Dict[str, Any]:
        """Per-layer formats and switching counters, the parameter copies the next forward pass uses,
        the loop's sums and the stochastic-rounding generator."""
        from ...checkpoint import generator_state
        return {
            "layers": {name: {f: getattr(st, f) for f in self._LAYER_FIELDS} for name, st in self.owners.items()},
            "copies": {n: {"wl": state_of(m).wl, "fl": state_of(m).fl, "q": dict(state_of(m).q)}
                       for n, m in self._fixed_point_modules()},
            "switches": self.switches, "sum_q": self.sum_q, "sum_f": self.sum_f,
            "strategy_steps": dict(self.strategy_steps),
            "schedule": {"strategy": self.schedule.strategy, "history": list(self.schedule.history)},
            "generator": generator_state(self.source.generator),
        }

    def restore_checkpoint_state(self, saved: Dict[str, Any]) -> None:
        from ...checkpoint import set_generator_state
        if set(saved["layers"]) != set(self.owners):
            raise ValueError("its MARViN layers are not this model's")
        for name, fields in saved["layers"].items():
            st = self.owners[name]
            for f in self._LAYER_FIELDS:
                setattr(st, f, fields[f])
            st.trajectory, st.steps_at_wl = list(st.trajectory), dict(st.steps_at_wl)
            if st.grad_sum is not None:          # checkpoints are read onto the CPU
                st.grad_sum = st.grad_sum.to(st.module.weight.device)
        for n, m in self._fixed_point_modules():
            fp, c = state_of(m), saved["copies"][n]
            fp.wl, fp.fl = c["wl"], c["fl"]
            fp.q = {k: q.to(m._parameters[k].device) for k, q in c["q"].items()}
        self.switches, self.sum_q, self.sum_f = list(saved["switches"]), saved["sum_q"], saved["sum_f"]
        self.strategy_steps = dict(saved["strategy_steps"])
        self.schedule.strategy, self.schedule.history = saved["schedule"]["strategy"], list(saved["schedule"]["history"])
        set_generator_state(self.source.generator, saved["generator"])

    def on_train_end(self, state) -> None:
        """Freeze: the delivered model's parameters are the last fixed-point copies."""
        self.source.generator = None
        with self._torch.no_grad():
            for st in self.owners.values():
                for m in self.modules_of(st):
                    fp = state_of(m)
                    for n, q in fp.q.items():
                        m._parameters[n].data.copy_(q)
                    fp.q = {}

    def close(self) -> None:
        """After a failed training: masters back in place, the random source dropped."""
        self.source.generator = None
        for st in self.owners.values():
            for m in self.modules_of(st):
                state_of(m).restore(m)
