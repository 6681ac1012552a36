"""Issue 22, the card-content items: a card never prints a schema default as a measurement, says when
its model is at chance, what its calibration images were used for, what its speedup means, which
images it was scored on, and lists reference rows of its own dataset only.

The user-method test runs `qcard run` in a real subprocess on a user's own method file."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qcard.cards.render import render_card

TESTS = Path(__file__).resolve().parent
FIXTURES = TESTS / "fixtures" / "cards"

# three user methods that quantize weights to 4 bits and return no per-layer records: with qcard's own
# builder, with qcard's FakeQuantize put on the layers by hand, and by rounding the weights in place
USER_METHODS = '''
import torch
import torch.nn.utils.parametrize
from torch import nn
from qcard.methods.base import Method, MethodParams, QuantResult
from qcard.quant.qspec import QSpec
from qcard.quant.quantizer import FakeQuantize

BLOCK = {"weights": {"bits": 4, "granularity": "per_tensor", "symmetric": True, "signed": True},
         "activations": {"bits": None}}


class Built(Method):
    name = "w4_built"

    def apply(self, model, data, params, ctx):
        from qcard.quant.calibrate import set_weight_ranges
        from qcard.quant.graph import build_simulated
        from qcard.quant.scheme import SimScheme
        x = next(iter(data.loader(data.calibration_set(8))))[0]
        sim = build_simulated(model, SimScheme(w_bits=4, a_bits=None, first_layer="same", last_layer="same"),
                              x[:1], log=ctx.log)
        set_weight_ranges(sim)
        return QuantResult(model=sim, quantization=dict(BLOCK))


class ByHand(Method):
    name = "w4_by_hand"

    def apply(self, model, data, params, ctx):
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fq = FakeQuantize(QSpec(bits=4, symmetric=True, signed=True))
                w = m.weight.detach()
                fq.set_range(w.min(), w.max())
                torch.nn.utils.parametrize.register_parametrization(m, "weight", fq)
        return QuantResult(model=model, quantization=dict(BLOCK))


def constant_model():
    """A model with zero weights: every logit ties, so it answers class 0 for every image."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    nn.init.zeros_(model[1].weight)
    nn.init.zeros_(model[1].bias)
    return model


class InPlace(Method):
    name = "w4_in_place"

    def apply(self, model, data, params, ctx):
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    s = p.abs().max().clamp_min(1e-12) / 7
                    p.copy_((p / s).round().clamp(-8, 7) * s)
        return QuantResult(model=model, quantization=dict(BLOCK))
'''


@pytest.fixture(scope="module")
def user_method_cards(tmp_path_factory):
    """One real `qcard run` of the three user methods on the bundled LeNet (200 eval images)."""
    root = tmp_path_factory.mktemp("user")
    (root / "my_methods.py").write_text(USER_METHODS)
    cfg = root / "user.yaml"
    cfg.write_text(textwrap.dedent("""\
        experiment: user
        models: [qcard:lenet5, {ref: "python:my_methods:constant_model", label: constant}]
        dataset: {ref: qcard:mnist5k, eval_split: test, eval_size: 200, batch_size: 200, calibration: {size: 16}}
        methods: [fp32, "my_methods:Built", "my_methods:ByHand", "my_methods:InPlace"]
        """))
    import os
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "qcard.cli", "run", str(cfg), "--out", str(root / "runs"),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    cards = {}
    for path in (root / "runs" / "user").glob("*/card.json"):
        card = json.loads(path.read_text())
        name = card["method"]["name"] + ("@constant" if card["model"]["label"] == "constant" else "")
        cards[name] = (card, (path.parent / "card.md").read_text(), done.stdout)
    assert len(cards) == 8 and {"w4_built", "w4_by_hand", "w4_in_place", "fp32@constant"} <= set(cards), sorted(cards)
    cards["_folder"] = root / "runs" / "user"
    return cards


def test_user_method_built_with_qcard_gets_its_records_from_the_model(user_method_cards):
    card, md, _ = user_method_cards["w4_built"]
    convs = [l for l in card["cost"]["layers"] if l["op"].startswith(("conv", "linear"))]
    assert convs and all(l["weight_bits"] == 4 for l in convs), convs
    assert card["cost"]["speedup_vs_fp32"] == pytest.approx(8.0, rel=1e-6)
    assert card["cost"]["size_bits"] < 32 * card["cost"]["params"] / 4
    # the keys the method left out are read from its simulated model, not the schema's defaults
    assert card["quantization"]["first_layer"]["weight_bits"] == 4
    assert "FP32 (not quantized)" not in md and "not reported" not in md


def test_user_method_with_its_own_quantizers_gets_their_bits(user_method_cards):
    card, md, _ = user_method_cards["w4_by_hand"]
    convs = [l for l in card["cost"]["layers"] if l["op"].startswith(("conv", "linear"))]
    assert convs and all(l["weight_bits"] == 4 for l in convs), convs
    assert "| first layer | not reported by the method |" in md
    assert "FP32 (not quantized)" not in md


def test_user_method_without_records_or_quantizers_is_flagged_not_priced_as_fp32(user_method_cards):
    card, md, log = user_method_cards["w4_in_place"]
    assert any(w.startswith("cost not derived from the quantized model") for w in card["warnings"])
    assert "cost not derived from the quantized model" in log          # said on the console too
    assert "cost not derived from the quantized model" in md[:md.index("| metric |")]   # in the banner
    assert "1.00× vs FP32" not in md and "not derived" in md
    assert "FP32 (not quantized)" not in md and "| first layer | not reported by the method |" in md
    layers = md.split("| layer |")[1].split("\n\n")[0]
    assert "| 4 |" not in layers and "| unknown | unknown | unknown |" in layers and "⚠ FP32" not in layers


# ---------------------------------------------------------------- item 8: a model at chance is flagged

def test_a_model_answering_one_class_is_flagged_on_its_cards_and_in_compare(user_method_cards):
    card, md, _ = user_method_cards["fp32@constant"]
    assert card["results"]["chance"]["one_class"] == 0 and card["results"]["chance"]["at_chance"] is True
    banner = md[:md.index("## Results")]
    assert "Read first" in banner and "FP32 is right on exactly the images of class 0" in banner
    good, good_md, _ = user_method_cards["fp32"]
    chance = good["results"]["chance"]
    assert 10.0 <= chance.pop("chance_top1") <= 15.0          # the most common class of 200 stratified images
    assert chance == {"num_classes": 10, "eval_classes": 10, "at_chance": False, "one_class": None}
    assert "Read first" not in good_md
    from qcard.cards.compare import compare_cards, load_cards
    cmp = compare_cards(load_cards([user_method_cards["_folder"]]))
    flagged = [line for line in cmp.read_first() if "class 0" in line]
    assert len(flagged) == 1 and flagged[0].count(",") >= 3          # said once, for all 4 constant-model cards
    out = cmp.to_markdown()
    assert out.index("Read first") < out.index("## Cards")


class _Labels:
    def __init__(self, labels):
        self.labels = labels

    def targets(self):
        return list(self.labels)


def _fp32(right):
    from qcard.stats.outcomes import pack_outcomes
    import numpy as np
    return {"n": len(right), "outcomes": pack_outcomes(np.asarray(right, dtype=bool))}


def test_chance_check_from_labels_and_outcomes():
    from qcard.evaluate import chance_check
    labels = [0, 1, 2] * 100
    one = chance_check(_fp32([y == 1 for y in labels]), _Labels(labels), 3)       # answers class 1 always
    assert one == {"num_classes": 3, "eval_classes": 3, "chance_top1": 33.3333, "at_chance": True, "one_class": 1}
    mixed = chance_check(_fp32([(i // 3) % 3 == i % 3 for i in range(300)]), _Labels(labels), 3)
    assert mixed["at_chance"] is True and mixed["one_class"] is None             # 33 % spread over classes
    learned = chance_check(_fp32([i % 10 != 0 for i in range(300)]), _Labels(labels), 3)
    assert learned["at_chance"] is False and learned["one_class"] is None
    single = chance_check(_fp32([True] * 50), _Labels([4] * 50), 10)
    assert single["eval_classes"] == 1 and single["one_class"] is None


def _card(name="ptq_w4a8_resnet18"):
    return json.loads((FIXTURES / f"{name}.json").read_text())


def test_at_chance_card_banner_and_trivial_top5():
    card = _card()
    card["results"]["chance"] = {"num_classes": 3, "eval_classes": 3, "chance_top1": 33.3333, "at_chance": True,
                                 "one_class": None}
    md = render_card(card, "md")
    banner = md[:md.index("## Results")]
    assert "FP32 is at chance" in banner and "33.33 %" in banner
    assert "| top5 | — | — | — | trivially 100 % with 3 classes |" in md
    for fmt in ("html", "tex"):
        assert "FP32 is at chance" in render_card(card, fmt)


def test_eval_set_of_one_class_and_its_subset_are_said():
    card = _card()
    card["dataset"]["eval_size"] = 100
    card["dataset"]["split_info"] = {"subset": {"kind": "first", "size": 100, "chosen_by": "config (eval_subset)"}}
    card["results"]["chance"] = {"num_classes": 1000, "eval_classes": 1, "chance_top1": 100.0, "at_chance": True,
                                 "one_class": None}
    md = render_card(card, "md")
    assert "100 images (the first 100 of the split, in file order, config (eval_subset))" in md
    assert "the 100 eval images are all of one class" in md[:md.index("## Results")]


# ---------------------------------------------------------------- item 9: what the calibration images were for

def _qat_card(with_used_for: bool):
    card = _card()
    card["method"].update(name="qat", family="qat")
    card["dataset"]["calibration"] = {"split": "train", "size": 4000, "seed": 0, "labels_used": True}
    card["method_stats"] = {"qat": {"init_calibration": {"split": "train", "size": 1024, "seed": 0}}}
    if with_used_for:
        card["dataset"]["calibration"].update(used_for="training",
                                              range_init={"split": "train", "size": 1024, "seed": 0})
    card["id"] = f"{int(with_used_for) + 7:064x}"
    return card


@pytest.mark.parametrize("with_used_for", [True, False])      # False: a card written before used_for
def test_training_card_says_training_set_and_range_initialisation_apart(with_used_for):
    md = render_card(_qat_card(with_used_for), "md")
    assert "| training data | 4,000 images from train, seed 0 |" in md
    assert "| range initialisation | 1,024 images from train, seed 0 (before training) |" in md
    assert "| calibration data | 4,000" not in md
    from qcard.cards.compare import compare_cards
    ptq = _card()                                              # calibrated on 1,024 images
    diffs = compare_cards([ptq, _qat_card(with_used_for)]).differences
    assert not [d for d in diffs if d.startswith("calibration")], diffs     # same 1,024 range images
    other = _card()
    other["dataset"]["calibration"]["size"] = 256
    other["id"] = "9" * 64
    diffs = compare_cards([other, _qat_card(with_used_for)]).differences
    assert "calibration 256 vs 1024 images" in diffs, diffs


# ---------------------------------------------------------------- item 10: reference rows of the cards' dataset

def test_reference_rows_only_for_the_cards_dataset():
    from qcard.cards.compare import compare_cards
    imagenet = _card()
    cmp = compare_cards([imagenet], reference=True)
    assert len(cmp.reference) > 0 and set(cmp.reference["dataset"]) == {"ImageNet-1k"}
    three = _card()
    three["dataset"].update(ref="imagefolder:/data/three_classes", eval_size=300,
                            split_info={"num_classes": 3, "class_map": {"kind": "imagenet", "folder_classes": 3,
                                                                        "model_classes": 1000}})
    none = compare_cards([three], reference=True)
    assert len(none.reference) == 0
    md = none.to_markdown()
    assert "on imagefolder:/data/three_classes (3 classes)" in md and "ImageNet-1k" in md
    every = compare_cards([three], reference="all")
    md = every.to_markdown()
    assert len(every.reference) > 0 and "| source | dataset |" in md and "not comparable" in md


# ---------------------------------------------------------------- item 11: speedup defined where it is shown

def test_speedup_is_defined_on_the_card_and_in_the_compare_legend():
    from qcard.cards.compare import compare_cards
    from qcard.cost.profile import SPEEDUP_WORDS, list_profiles, load_profile
    card = _card("marvin_resnet8")
    md = render_card(card, "md")
    assert "| speedup means | weight-bit-weighted MACs, Σ 32·MACs / Σ b_w·MACs" in md
    assert "activation bits do not enter it" in md
    legend = compare_cards([card]).to_markdown()
    assert "speedup vs FP32 (bitops): weight-bit-weighted MACs" in legend
    for name in list_profiles():      # every shipped profile's speedup has its words
        prof = load_profile(name)
        assert prof.speedup is None or prof.speedup.definition in SPEEDUP_WORDS


def test_speedup_words_match_the_cost_model():
    """W4A4 and W4A8 get the same bitops speedup while their BOPs halve: what the definition says."""
    from qcard.cost import estimate, load_profile, trace_layers
    from qcard.cost.model import apply_bits
    from qcard.cost.profile import speedup_definition
    from qcard.zoo import load_model
    records = trace_layers(load_model("qcard:lenet5"), (1, 28, 28))
    prof = load_profile("bitops")
    a4 = estimate(apply_bits(records, 4, 4), prof)
    a8 = estimate(apply_bits(records, 4, 8), prof)
    assert a4["speedup_vs_fp32"] == a8["speedup_vs_fp32"] and a4["bops"] * 2 == pytest.approx(a8["bops"])
    assert "W4A4 and W4A8 get the same speedup" in speedup_definition(a4)


# ---------------------------------------------------------------- item 12 (card side)

def test_weightless_ops_show_no_weight_bits_and_statistics_are_summarised():
    card = _card("marvin_resnet8")
    card["cost"]["layers"].insert(3, {"name": "layer1.add", "op": "add", "macs": 0, "params": 0, "weight_bits": None,
                                      "activation_bits": 8.0, "bops": 0.0})
    md = render_card(card, "md")
    rows = [l for l in md.split("| layer |")[1].split("\n\n")[0].splitlines() if l.startswith("| `")]
    adds = [r for r in rows if "| add |" in r or "pool |" in r]
    assert adds and all(r.split("|")[5].strip() == "—" for r in adds), adds
    assert "entries" not in md


def test_ptq_params_not_used_by_the_pipeline_are_listed_apart():
    from qcard.methods.ptq.params import PTQParams
    p = PTQParams(w_bits=4, a_bits=8, pipeline="minmax")
    unused = p.unused_params()
    assert unused["bias_correction"] == "no bias_correction step in minmax" and "adaround_iters" in unused
    assert "bias_correction" not in PTQParams(w_bits=4, a_bits=8, pipeline="standard").unused_params()
    card = _card()
    card["method"]["params"] = p.model_dump(mode="json")
    card["method_stats"] = {"params_not_used": unused}
    md = render_card(card, "md")
    resolved = md[md.index("Method parameters (resolved)"):].split("\n")[0]
    assert "bias_correction" not in resolved and "adaround" not in resolved and "w_bits = 4" in resolved
    assert "Not used by this point" in md and "bias_correction (no bias_correction step in minmax)" in md


def test_fp32_card_says_batch_norm_as_the_ptq_cards_do():
    from qcard.methods.fp32 import fp32_block
    from qcard.zoo import load_model
    assert fp32_block(load_model("qcard:lenet5"))["batch_norm"] == "none"       # lenet5 has no batch norm
    assert fp32_block(load_model("qcard:resnet8"))["batch_norm"] == "kept"


def test_profiles_lists_what_each_models():
    from click.testing import CliRunner
    from qcard.cli import main
    out = CliRunner().invoke(main, ["profiles"])
    assert out.exit_code == 0
    lines = {l.split()[0]: l for l in out.output.splitlines() if l.strip()}
    assert "Horowitz" in lines["asic45"] and "speedup = weight-bit-weighted MACs" in lines["bitops"]
    assert "latency" in lines["systolic-ws"]


def test_compare_does_not_price_a_card_whose_cost_was_not_derived(user_method_cards):
    from qcard.cards.compare import compare_cards
    lenet = [c for k, (c, _, _) in ((k, v) for k, v in user_method_cards.items() if k != "_folder")
             if c["model"]["label"] != "constant"]
    cmp = compare_cards(lenet)
    rows = {r["method"]: r for r in cmp.rows}
    assert rows["w4_in_place"]["bops"] is None and rows["w4_in_place"]["speedup_vs_fp32"] is None
    assert rows["w4_built"]["speedup_vs_fp32"] == pytest.approx(8.0)
    assert rows["w4_in_place"]["card"] not in [cmp.rows[i]["card"] for i in cmp.pareto]
