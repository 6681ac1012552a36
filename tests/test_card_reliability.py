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


class InPlace(Method):
    name = "w4_in_place"

    def apply(self, model, data, params, ctx):
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    s = p.abs().max() / 7
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
        models: [qcard:lenet5]
        dataset: {ref: qcard:mnist5k, eval_split: test, eval_size: 200, batch_size: 200, calibration: {size: 16}}
        methods: ["my_methods:Built", "my_methods:ByHand", "my_methods:InPlace"]
        """))
    import os
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "qcard.cli", "run", str(cfg), "--out", str(root / "runs"),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    cards = {}
    for path in (root / "runs" / "user").glob("*/card.json"):
        card = json.loads(path.read_text())
        cards[card["method"]["name"]] = (card, (path.parent / "card.md").read_text(), done.stdout)
    assert set(cards) == {"w4_built", "w4_by_hand", "w4_in_place"}, sorted(cards)
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
