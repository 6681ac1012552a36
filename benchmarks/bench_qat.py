"""QAT (LSQ) training step time ÷ FP32 training step time, measured side by side in one run.

    python benchmarks/bench_qat.py [--model resnet18] [--batch 16] [--size 224] [--steps 5] [--threads N]
                                   [--bits 4] [--bn keep_then_fold|static_fold] [--grad-scale]

torchvision model with random weights on random data (CPU). One step = forward, cross-entropy, backward,
Adam step — the step of qcard.training.train. The QAT model is the one the qat method trains: quantizers
placed by the PTQ engine, ranges initialized (min-max weights, MSE activations), every weight and activation
quantizer an LSQ quantizer with learnable scale and zero point. Steps of the two models are interleaved and
medians reported, so load on a shared machine hits both alike. Target: ratio ≤ 1.5.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def build_qat(model, calib, bits: int, bn: str, grad_scale: bool):
    from qcard.methods.qat import QATParams
    from qcard.methods.qat.run import make_learnable, quantizers_of
    from qcard.quant.graph import build_simulated
    from qcard.methods.ptq.pipeline import run_steps
    from qcard.methods.base import RunContext
    p = QATParams(w_bits=bits, a_bits=bits, bn=bn, lsq_grad_scale=grad_scale,
                  w_granularity="per_channel" if bn == "keep_then_fold" else "per_tensor")
    ptq = p.ptq_params()
    scheme = ptq.model_copy(update={"bn": "folded" if p.bn == "static_fold" else "kept"})
    sim = build_simulated(model, scheme, calib[0][:1], log=lambda m: None)
    run_steps(sim, ptq, list(ptq.steps), calib, RunContext(seed=0, progress=False, log=lambda m: None), {})
    make_learnable(p, *quantizers_of(sim), sim)     # the method's own choice of what LSQ learns
    return sim


def make_step(model, x, y):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--bn", choices=["keep_then_fold", "static_fold"], default="keep_then_fold")
    ap.add_argument("--grad-scale", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    import torchvision
    fp32 = getattr(torchvision.models, a.model)(weights=None, num_classes=1000)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, 3, a.size, a.size, generator=g)
    y = torch.randint(0, 1000, (a.batch,), generator=g)
    calib = [torch.randn(4, 3, a.size, a.size, generator=g)]
    qat = build_qat(fp32.eval(), calib, a.bits, a.bn, a.grad_scale)
    steps = {"fp32": make_step(fp32, x, y), "qat": make_step(qat, x, y)}
    times = {k: [] for k in steps}
    for k, fn in steps.items():        # warm-up (allocator, autograd graph)
        fn()
    for _ in range(a.steps):
        for k, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["qat"] / med["fp32"]
    print(f"{a.model} batch {a.batch} {a.size}x{a.size}, {a.threads} thread(s), W{a.bits}A{a.bits} LSQ, bn {a.bn}"
          f"{', grad scale' if a.grad_scale else ''}")
    print(f"FP32 train step {med['fp32'] * 1000:.0f} ms | QAT (LSQ) train step {med['qat'] * 1000:.0f} ms | "
          f"ratio {ratio:.2f} (target <= 1.5)")
    return ratio


if __name__ == "__main__":
    main()
