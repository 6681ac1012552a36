"""`qcard cost MODEL`: per-layer table and totals without a dataset."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("torchvision")

from qcard.commands.cost import cost  # noqa: E402

LAYER_KEYS = {"name", "op", "macs", "params", "weight_bits", "activation_bits", "bops", "cycles", "energy_pj"}
TOTAL_KEYS = {"profile", "params", "size_bits", "size_bits_with_metadata", "macs", "bops", "bops_uniq",
              "activation_peak_bits", "memory_traffic_bits", "energy_pj", "latency_cycles",
              "speedup_vs_fp32", "speedup_vs_int8"}


def run(*args):
    return CliRunner().invoke(cost, list(args), catch_exceptions=False)


def test_json_output():
    res = run("torchvision:resnet18", "--w-bits", "8", "--a-bits", "8", "--profile", "systolic-ws", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert {"model", "profile", "total", "layers"} <= set(out)
    assert out["model"] == "torchvision:resnet18" and out["profile"] == "systolic-ws"
    assert out["input_shape"] == [3, 224, 224]
    total = out["total"]
    assert TOTAL_KEYS <= set(total)
    assert total["macs"] == 1_814_073_344 and total["params"] == 11_689_512
    assert total["bops"] == 64 * total["macs"]
    assert total["speedup_vs_int8"] == 1.0 and total["latency_cycles"] > 0
    assert all(LAYER_KEYS <= set(layer) for layer in out["layers"])
    first = out["layers"][2]
    assert first["name"] == "layer1.0.conv1" and first["macs"] == 115_605_504 and first["cycles"] == 116_280
    assert "by_profile" not in out


def test_table_output_and_several_profiles():
    res = run("torchvision:resnet18", "--w-bits", "4", "--a-bits", "4", "--profile", "bitops",
              "--profile", "asic45")
    assert res.exit_code == 0, res.output
    text = res.output
    assert "profile bitops" in text and "profile asic45" in text
    assert "layer1.0.conv1" in text and "115,605,504" in text
    assert "speedup_vs_fp32" in text and "8.000x" in text
    assert "energy_pj" in text


def test_json_several_profiles_and_input_shape():
    res = run("torchvision:resnet18", "--profile", "bitops", "--profile", "gpu-t4",
              "--input-shape", "3,112,112", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["profile"] == "bitops" and set(out["by_profile"]) == {"bitops", "gpu-t4"}
    assert out["input_shape"] == [3, 112, 112]
    assert out["total"]["macs"] < 1_814_073_344 / 3
    assert out["by_profile"]["gpu-t4"]["total"]["latency_cycles"] > 0
    assert any("HAWQ-V3" in n for n in out["by_profile"]["gpu-t4"]["total"]["notes"])


def test_default_input_shape_from_model_info():
    res = run("qcard:lenet5", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["input_shape"] == [1, 28, 28] and out["total"]["speedup_vs_fp32"] == 1.0


@pytest.mark.parametrize("args,message", [
    (["torchvision:resnet18", "--profile", "asic64"], "did you mean 'asic45'"),
    (["torchvision:resnet18", "--input-shape", "3,x,224"], "--input-shape"),
    (["torchvision:resnet18", "--w-bits", "0"], "--w-bits"),
    (["torchvision:resnet1800"], "resnet1800"),
])
def test_errors_exit_2(args, message):
    res = CliRunner().invoke(cost, args)
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output


def test_registered_in_cli_and_help_is_light():
    code = ("import sys; from click.testing import CliRunner; from qcard.cli import main; "
            "r = CliRunner().invoke(main, ['cost', '--help']); "
            "assert r.exit_code == 0 and '--w-bits' in r.output, r.output; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


class NeedsRealTensors(__import__("torch").nn.Module):
    """Cannot be built on the meta device (.item() in __init__) and branches on values in forward:
    the command falls back to a normal CPU build and trace."""
    input_shape = (3, 8, 8)

    def __init__(self):
        super().__init__()
        import torch
        self.k = int(torch.ones(1).item()) * 3
        self.conv = torch.nn.Conv2d(3, 4, self.k, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y if float(y.sum()) >= -1e30 else -y


def test_model_needing_real_tensors_falls_back_to_cpu():
    res = run("python:test_cost_cli:NeedsRealTensors", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["input_shape"] == [3, 8, 8]
    assert out["total"]["macs"] == 8 * 8 * 4 * 27
