"""W8A8 fake-quant evaluation time ÷ FP32 evaluation time, qcard beside torch.ao, measured in one run.

    python benchmarks/bench_ptq.py [--model resnet18] [--batch 16] [--size 224] [--repeats 20] [--threads N]

Both simulated models quantize the same way (per-channel symmetric int8 weights, per-tensor affine uint8
activations, min-max ranges, BN folded). torch.ao's is its FX fake-quant model (prepare_qat_fx with
FakeQuantize qconfigs, BN statistics frozen, calibrated, observers off), evaluated without convert. Timings interleave the three models and
report medians, so load on a shared machine hits all of them alike.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def _timeit(fn, repeats: int):
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def build_qcard(model, calib):
    from qcard.quant.calibrate import calibrate_activations, set_weight_ranges
    from qcard.quant.graph import build_simulated
    from qcard.quant.scheme import SimScheme
    cfg = SimScheme(w_bits=8, a_bits=8, w_granularity="per_channel", w_symmetric=True, a_symmetric=False,
                    bn="folded", weight_range="minmax", activation_range="minmax", input_bits=8)
    sim = build_simulated(model, cfg, calib[0][:1], log=lambda m: None)
    set_weight_ranges(sim)
    calibrate_activations(sim, calib)
    return sim.eval()


def torch_ao_qconfig_mapping():
    """torch.ao's spelling of the same scheme, with FakeQuantize modules so the prepared model
    simulates quantization (the default PTQ qconfig inserts observers only, which compute in FP32)."""
    from torch.ao.quantization import FakeQuantize, MinMaxObserver, PerChannelMinMaxObserver, QConfig, QConfigMapping
    qc = QConfig(
        activation=FakeQuantize.with_args(observer=MinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
                                          qscheme=torch.per_tensor_affine),
        weight=FakeQuantize.with_args(observer=PerChannelMinMaxObserver, quant_min=-128, quant_max=127,
                                      dtype=torch.qint8, qscheme=torch.per_channel_symmetric))
    return QConfigMapping().set_global(qc)


def build_torch_ao(model, calib):
    """prepare_qat_fx (conv-bn(-relu) fused, weights fake-quantized in forward, BN statistics frozen),
    calibrated in eval mode, observers then switched off; evaluated without convert."""
    import copy
    from torch.ao.quantization import disable_observer
    from torch.ao.quantization.quantize_fx import prepare_qat_fx
    m = copy.deepcopy(model).train()
    prepared = prepare_qat_fx(m, torch_ao_qconfig_mapping(), (calib[0][:1],))
    prepared.eval()
    prepared.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
    with torch.no_grad():
        for x in calib:
            prepared(x)
    prepared.apply(disable_observer)
    return prepared


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import torchvision
    import warnings
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(weights=None).eval()
    calib = [torch.randn(args.batch, 3, args.size, args.size) for _ in range(2)]
    x = torch.randn(args.batch, 3, args.size, args.size)
    sim = build_qcard(model, calib)
    ao = build_torch_ao(model, calib)
    times = {"fp32": [], "qcard": [], "torch.ao": []}
    models = {"fp32": model, "qcard": sim, "torch.ao": ao}
    with torch.no_grad():
        for m in models.values():
            m(x)
        for _ in range(args.repeats):          # interleaved: shared-machine noise hits all alike
            for name, m in models.items():
                t0 = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"model": args.model, "batch": args.batch, "size": args.size, "threads": torch.get_num_threads(),
           "fp32_s": med["fp32"], "qcard_s": med["qcard"], "torch_ao_s": med["torch.ao"],
           "qcard_ratio": med["qcard"] / med["fp32"], "torch_ao_ratio": med["torch.ao"] / med["fp32"]}
    print(f"{args.model} batch {args.batch} {args.size}x{args.size} CPU, {res['threads']} threads, "
          f"median of {args.repeats}:")
    print(f"  FP32            {med['fp32'] * 1e3:8.1f} ms")
    print(f"  qcard W8A8      {med['qcard'] * 1e3:8.1f} ms   ratio {res['qcard_ratio']:.3f}")
    print(f"  torch.ao W8A8   {med['torch.ao'] * 1e3:8.1f} ms   ratio {res['torch_ao_ratio']:.3f}")
    return res


if __name__ == "__main__":
    main()
