"""Where runtime and simulation part on a deeper network: torchvision resnet18, briefly trained on mnist5k at
3x64x64, PTQ W8A8, deploy check on onnxruntime with and without the exporter's bias fit (issue 21).

    python benchmarks/bench_deploy_bias.py [--epochs 2] [--eval-size 1000] [--cache DIR]

onnxruntime quantizes each float Conv/Gemm bias to int32 at s_in·s_w (saturating). A channel whose weights
are all zero (a batch norm with gamma ~ 0 folded in; cross-layer equalization can make more of them) gets
the float-eps weight scale, its bias saturates on the runtime and is lost there, not in the simulation.
The exporter gives such channels a scale at which the bias fits (their weights dequantize to 0 at any
scale); "before" below is the export without that fit. The trained weights are cached outside the
repository (--cache, default ~/.cache/qcard/bench), deterministic from seed 0.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


class Upsampled(torch.utils.data.Dataset):
    """mnist5k at 3x64x64 (bilinear, the gray channel repeated): images whose labels carry information."""

    def __init__(self, ds, size: int = 64):
        self.ds, self.size = ds, size

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        x = F.interpolate(torch.as_tensor(x).float()[None], size=self.size, mode="bilinear", align_corners=False)[0]
        return x.repeat(3, 1, 1), y


def trained_resnet18(train, epochs: int, cache: Path):
    import torchvision
    path = cache / f"resnet18_mnist5k64_e{epochs}_s0.pt"
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    dl = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.05, total_steps=epochs * len(dl))
    for _ in range(epochs):
        model.train()
        for x, y in dl:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/qcard/bench"))
    ap.add_argument("--dead-channels", type=int, default=0,
                    help="set gamma = 0 on this many channels of each batch norm in layer2-4 (dead channels, as "
                         "long training with weight decay leaves them): their folded weights are all zero")
    ap.add_argument("--pipelines", default="standard-pc,minmax-pc,minmax-pt")
    a = ap.parse_args(argv)
    import copy

    from qcard.data import load_dataset
    from qcard.deploy import deploy_check, export
    from qcard.methods.base import PointData, RunContext
    from qcard.methods.ptq import PTQ, PTQParams
    from qcard.data.base import TensorQDataset
    train = Upsampled(load_dataset("qcard:mnist5k", "train"))
    test = torch.utils.data.Subset(Upsampled(load_dataset("qcard:mnist5k", "test")), range(a.eval_size))
    # calibration draws from a qcard dataset of the training split: the upsampled images, in memory
    images, labels = zip(*(train[i] for i in range(len(train))))
    train_q = TensorQDataset(ref="mnist5k@64", split="train", images=torch.stack(images),
                             labels=torch.tensor(labels), num_classes=10, preprocessing={}, split_info={},
                             fingerprint="")
    t0 = time.time()
    model = trained_resnet18(train, a.epochs, Path(a.cache))
    print(f"resnet18 trained {a.epochs} epoch(s) on mnist5k 3x64x64 ({time.time() - t0:.0f} s)", flush=True)
    if a.dead_channels:
        with torch.no_grad():
            for name, m in model.named_modules():
                if isinstance(m, torch.nn.BatchNorm2d) and name.startswith(("layer2", "layer3", "layer4")):
                    m.weight[:a.dead_channels] = 0.0
        print(f"dead channels: gamma = 0 on the first {a.dead_channels} channels of every batch norm in layer2-4")
    data = PointData(train=train_q, eval=test, num_classes=10, input_shape=(3, 64, 64), calibration_size=256)
    fit = export._fit_biases
    print(f"{'pipeline':<24} {'export':<10} {'top-1 rt / sim':>16} {'identical argmax':>17} {'max steps':>9}  notes")
    settings = {"standard-pc": ("standard per-channel", dict(pipeline="standard", w_granularity="per_channel")),
                "minmax-pc": ("minmax per-channel", dict(pipeline="minmax", w_granularity="per_channel")),
                "minmax-pt": ("minmax per-tensor", dict(pipeline="minmax", w_granularity="per_tensor"))}
    for label, params in (settings[k] for k in a.pipelines.split(",")):
        ctx = RunContext(seed=0, progress=False, log=lambda m: None)
        sim = PTQ().apply(copy.deepcopy(model), data, PTQParams(w_bits=8, a_bits=8, **params), ctx).model
        for name, patch in (("no fit", lambda g: []), ("bias fit", fit)):
            export._fit_biases = patch
            try:
                d = deploy_check(sim, test, batch_sizes=[1], latency_runs=1, latency_budget_s=0.1,
                                 eval_batch_size=250)
            finally:
                export._fit_biases = fit
            notes = [n for n in d.get("notes", []) if "bias" in n and not n.startswith("biases:")]
            print(f"{label:<24} {name:<10} {d['top1']:>7.2f} / {d['top1_simulated']:<6.2f} "
                  f"{100 * d['argmax_agreement']:>15.1f} % {d['logit_diff_max_steps']:>9.1f}  "
                  f"{'; '.join(n[:160] for n in notes)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
