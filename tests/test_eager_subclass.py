"""Eager mode and subclasses of nn.Linear/nn.Conv2d (issue 15 follow-up): timm's `Linear` (forward =
F.linear(x, self.weight, self.bias)) is quantized like nn.Linear under its own path, so a timm
mobilenetv3 card's last layer is its classifier, quantized, with no warning about a layer the method
did not quantize or a record that matches no traced layer. A subclass that computes something else
(padding first) is not swapped."""
import torch
import torch.nn.functional as F
from torch import nn

from qcard.methods.ptq.params import PTQParams
from qcard.quant.eager import build_eager
from qcard.quant.modules import is_quant_layer


class PlainLinear(nn.Linear):          # as timm.layers.Linear: its own forward, the same computation
    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class PaddedConv(nn.Conv2d):           # as timm's Conv2dSame: pads first, so not the base's forward
    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = PaddedConv(1, 4, 3), PlainLinear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_plain_subclasses_are_quantized_and_others_are_not():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 1, 6, 6)
    ref, fc_weight = model(x), model.fc.weight
    sim = build_eager(model, PTQParams(w_bits=8, a_bits=8, graph_mode="eager"), x, "test", log=lambda m: None)
    info = sim.qcard_sim
    assert [li.name for li in info.layers if li.kind == "gemm"] == ["fc"]
    assert is_quant_layer(sim.fc) and not is_quant_layer(sim.conv)
    assert sim.fc.weight is fc_weight                       # the twin shares the parameters
    with torch.no_grad():
        for q in (sim.fc.weight_quantizer, sim.fc.input_quantizer):
            q.enabled = False
        assert torch.equal(sim(x), ref)                     # quantizers off: the same computation


def test_timm_mobilenetv3_eager_card_quantizes_its_classifier(write_config, tmp_path):
    import qcard
    from qcard.cards.schema import load_card
    cfg = write_config(
        f"experiment: mb\nout: {tmp_path / 'runs'}\n"
        "models: [{ref: 'timm:mobilenetv3_small_050', weights: random, num_classes: 10, input_shape: [3, 32, 32]}]\n"
        "dataset: {ref: synthetic, input_shape: [3, 32, 32], num_classes: 10, size: 16, eval_size: 16,"
        " batch_size: 16, calibration: {size: 8}}\n"
        "methods:\n  - {name: ptq, params: {w_bits: 8, a_bits: 8, graph_mode: eager, pipeline: minmax}}\n")
    summary = qcard.run(cfg, progress=False)
    assert summary.ok, [o.error for o in summary.outcomes]
    (path,) = sorted((tmp_path / "runs").glob("**/card.json"))
    card = load_card(path)
    assert card.quantization.graph_mode == "eager"
    last = card.quantization.last_layer
    assert last.name == "classifier" and last.weight_bits == 8 and last.activation_bits == 8
    assert [l.name for l in card.cost.layers][-1] == "classifier"
    assert not any("match no traced layer" in w or "did not quantize" in w or "classifier" in w
                   for w in card.warnings), card.warnings
