"""Issue acceptance: MARViN trained from scratch on qcard:resnet8 with the same recipe as FP32 training
(the recipe of configs/examples/marvin.yaml) stays within 0.5 points of FP32's mean accuracy over 3
seeds, with an inference speedup of at least 1.8 and precision switches inside epochs.

Expensive (3 seeds x 2 trainings of ResNet-8 on 4,000 images): marked slow. Prints the measured figures.
"""
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from qcard.data import load_dataset
from qcard.evaluate import evaluate
from qcard.methods.base import PointData, RunContext
from qcard.methods.fp32_train import FP32Train
from qcard.methods.marvin import Marvin
from qcard.runner import set_seed
from qcard.zoo import load_model

ROOT = Path(__file__).resolve().parent.parent
SEEDS = (0, 1, 2)


def example_params():
    cfg = yaml.safe_load((ROOT / "configs" / "examples" / "marvin.yaml").read_text())
    methods = {m["name"]: m["params"] for m in cfg["methods"]}
    return methods["fp32_train"], methods["marvin"]


@pytest.mark.slow
def test_marvin_resnet8_matches_fp32_training():
    torch.set_num_threads(2)
    fp_params, mv_params = example_params()
    assert fp_params["train"] == mv_params["train"]
    train_split = load_dataset("qcard:mnist5k", "train")
    test_split = load_dataset("qcard:mnist5k", "test")
    data = PointData(train_split, test_split, 10, (1, 28, 28), batch_size=500)
    fp_acc, mv_acc, rows = [], [], []
    for seed in SEEDS:
        for cls, params, accs in ((FP32Train, fp_params, fp_acc), (Marvin, mv_params, mv_acc)):
            set_seed(seed, True)
            model = load_model("qcard:resnet8")
            ctx = RunContext(seed=seed, progress=False, log=lambda m: None)
            res = cls().apply(model, data, cls.Params(**params), ctx)
            accs.append(evaluate(res.model, test_split, batch_size=500)["top1"])
            if cls is Marvin:
                s = res.stats["marvin"]
                rows.append((seed, accs[-1], s["inference_speedup"], s["training_speedup"], s["model_size_ratio"],
                             s["switch_count"], s["intra_epoch_switches"]))
    fp_mean, mv_mean = statistics.fmean(fp_acc), statistics.fmean(mv_acc)
    print(f"\nFP32 training: {fp_acc} mean {fp_mean:.2f}")
    print(f"MARViN:        {mv_acc} mean {mv_mean:.2f} ± {statistics.stdev(mv_acc):.2f}")
    for r in rows:
        print("seed %d: top1 %.1f, inference speedup %.3f, training speedup %.3f, size ratio %.3f, "
              "switches %d (%d inside epochs)" % r)
    assert mv_mean >= fp_mean - 0.5
    for seed, _, inference, training, _, switches, intra in rows:
        assert inference >= 1.8, f"seed {seed}: inference speedup {inference}"
        assert intra >= 1, f"seed {seed}: no precision switch inside an epoch"
        assert 1.0 < training < 2.0
