"""benchmarks/gpu_check.py (issue 24 item 3) without a GPU: it refuses cleanly when CUDA is asked for and
absent; its card comparison catches each kind of difference; its CPU path (a CPU-vs-CPU check of a method,
the W8A8 throughput code) runs."""
import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gc = load()


def card(kind: str):
    found = sorted((ROOT / "cards" / "quickstart").glob(f"*__{kind}__*/card.json"))
    assert found, kind
    return json.loads(found[0].read_text())


def test_without_cuda_it_exits_2_with_one_line():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no usable CUDA device" in lines[0] and "--devices cpu,cpu" in lines[0], lines
    assert done.stdout == ""


def test_the_cuda_refusal_depends_on_what_is_asked_and_present(monkeypatch):
    monkeypatch.setattr(gc.torch.cuda, "is_available", lambda: False)
    assert gc.cuda_problem(["cpu", "cpu"]) is None
    assert "asks for CUDA" in gc.cuda_problem(["cpu", "cuda"])
    monkeypatch.setattr(gc.torch.cuda, "is_available", lambda: True)
    assert gc.cuda_problem(["cpu", "cuda"]) is None


def test_bad_devices_or_methods_are_refused(capsys):
    assert gc.main(["--devices", "cpu"]) == 2
    assert gc.main(["--devices", "cpu,tpu", "--methods", "fp32"]) == 2
    assert gc.main(["--devices", "cpu,cpu", "--methods", "nope"]) == 2
    assert "unknown: ['nope']" in capsys.readouterr().err


def test_first_difference_names_the_path():
    assert gc.first_difference({"a": [1, {"b": 2}]}, {"a": [1, {"b": 2}]}) is None
    assert gc.first_difference({"a": [1, {"b": 2}]}, {"a": [1, {"b": 3}]}) == "a.1.b: 2 != 3"
    assert gc.first_difference({"a": [1]}, {"a": [1, 2]}) == "a: 1 items != 2 items"
    assert gc.first_difference({"a": 1}, {"a": 1, "c": 0}) == "c: only in the second card"


def test_identical_cards_hold_and_each_kind_of_difference_is_named():
    ref = card("SPARQ-A4W8")
    assert gc.compare_cards(ref, copy.deepcopy(ref)) == []
    cost = copy.deepcopy(ref)
    cost["cost_profiles"][next(iter(cost["cost_profiles"]))]["bops"] += 1
    problems = gc.compare_cards(ref, cost)
    assert len(problems) == 1 and problems[0].startswith("cost_profiles block differs (") and ".bops:" in problems[0]
    cost = copy.deepcopy(ref)
    cost["cost"]["macs"] += 1
    assert gc.compare_cards(ref, cost) == [f"cost block differs (macs: {ref['cost']['macs']} != "
                                           f"{ref['cost']['macs'] + 1})"]
    quant = copy.deepcopy(ref)
    quant["quantization"]["weights"]["bits"] = 4.0
    assert gc.compare_cards(ref, quant) == ["quantization block differs (weights.bits: 8.0 != 4.0)"]
    acc = copy.deepcopy(ref)
    lo, hi = ref["results"]["ci95"]
    acc["results"]["quantized"] = round(lo - 0.1, 4)
    assert gc.compare_cards(ref, acc) == [f"results.quantized {round(lo - 0.1, 4)} outside the reference's "
                                          f"95 % interval [{lo}, {hi}]"]
    acc["results"]["quantized"] = hi                      # the interval's ends are inside
    assert gc.compare_cards(ref, acc) == []
    codes = copy.deepcopy(ref)
    codes["method_stats"]["sparq"]["zero_fraction"] += 1e-9
    assert gc.compare_cards(ref, codes) == ["SPARQ code statistics differ (zero_fraction: "
                                            f"{ref['method_stats']['sparq']['zero_fraction']!r} != "
                                            f"{codes['method_stats']['sparq']['zero_fraction']!r})"]
    fp32 = card("fp32")
    assert gc.compare_cards(fp32, copy.deepcopy(fp32)) == []       # no SPARQ block: nothing to compare there


@pytest.mark.slow
def test_a_cpu_against_cpu_check_of_sparq_holds(capsys, tmp_path):
    assert gc.main(["--devices", "cpu,cpu", "--methods", "sparq", "--eval-size", "200", "--no-throughput",
                    "--no-warmup", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sparq: cpu vs cpu: top1 " in out and ": OK: identical blocks" in out, out
    assert "gpu_check: 1 of 1 method(s) hold" in out, out


@pytest.mark.slow
def test_the_throughput_code_runs_on_the_cpu():
    # resnet50's standard pipeline takes minutes on 2 CPU cores (its MSE weight ranges): the same code on a
    # torchvision model with 1/20 of its weights
    t = gc.throughput("cpu", arch="squeezenet1_1", batch=2, batches=1, size=64, calibration=2)
    assert t["fp32_images_per_s"] > 0 and t["w8a8_images_per_s"] > 0
    assert t["w8a8_over_fp32"] == pytest.approx(t["w8a8_images_per_s"] / t["fp32_images_per_s"])
