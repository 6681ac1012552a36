"""MARViN / AdaPT: adaptive per-layer fixed-point precision during training (Kummer et al., MARViN,
arXiv 2107.13490; AdaPT, SDM 2023; and the authors' code).

One job per file:
  rules.py        the pure rules (gradient diversity, lookback, push-up/down, KL tests, strategy, cost)
  fixed_point.py  the simulated layers by composition (FixedPointState + forward hooks on the module)
  trace.py        execution order and BN-after-conv detection (which layer produced each input)
  convert.py      which layers own a format, which use the preceding one's; attaching the states
  state.py        the per-layer switching state (LayerState)
  controller.py   the switching loop as hooks of the shared training loop (MarvinController)
  blocks.py       the card's method_stats.marvin, records and quantization block
  card.py         the card's sections (word lengths and switches tables, the trajectory plot), plain data
  method.py       the method (Marvin, registered as "marvin") and its Params
"""
from .controller import MarvinController
from .method import Marvin
from .rules import (STRATEGIES, StrategySchedule, gradient_diversity, kl_histograms, make_lost_test, marvin_cost,
                    push_down, push_down_reference, push_up, push_up_step, reference_kl_loss, smallest_passing,
                    training_speedup, update_lookback, update_resolution)
from .state import LayerState

__all__ = ["Marvin", "MarvinController", "LayerState", "STRATEGIES", "StrategySchedule", "gradient_diversity",
           "kl_histograms", "make_lost_test", "marvin_cost", "push_down", "push_down_reference", "push_up",
           "push_up_step", "reference_kl_loss", "smallest_passing", "training_speedup", "update_lookback",
           "update_resolution"]
