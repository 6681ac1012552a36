"""`qcard compare` and qcard.cards.compare: confounding differences in plain words, the table,
the Pareto front, exports, published reference rows kept apart, failed cards listed."""
import copy
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from qcard.cards.compare import card_letter, compare_cards, load_cards, pareto_front
from qcard.cards.reference import model_key, reference_rows
from qcard.cli import main
from qcard.errors import QcardError

FIXTURES = Path(__file__).parent / "fixtures" / "cards"


def ptq():
    return json.loads((FIXTURES / "ptq_w4a8_resnet18.json").read_text(encoding="utf-8"))


def variant(card, **changes):
    """A copy of card with dotted-key changes: variant(c, **{"quantization.batch_norm": "kept"})."""
    c = copy.deepcopy(card)
    for dotted, value in changes.items():
        node = c
        *path, last = dotted.split(".")
        for k in path:
            node = node[k]
        node[last] = value
    c["id"] = f"{abs(hash(json.dumps(changes, sort_keys=True))):064x}"[-64:]
    return c


def the_same_run_with(card, **changes):
    """What differs anyway between two points of one experiment: results, cost, timings, ids."""
    c = variant(card, **changes)
    c["results"].update(quantized=c["results"]["quantized"] - 0.7, delta=c["results"]["delta"] - 0.7, std=0.2)
    c["cost"]["bops"] *= 1.3
    c["cost"]["energy_pj"] *= 1.2
    c["provenance"].update(started_at="2025-03-15T10:00:00+00:00", wall_seconds=901.0)
    return c


def test_three_confounders_named_in_plain_words():
    a = ptq()
    b = the_same_run_with(a, **{
        "quantization.weights.granularity": "per_tensor",
        "quantization.first_layer": {"weight_bits": 8, "activation_bits": 8, "name": "conv1"},
        "quantization.last_layer": {"weight_bits": 8, "activation_bits": 8, "name": "fc"},
        "quantization.unquantized_layers": [a["quantization"]["unquantized_layers"][2]],
        "quantization.hardware_unfriendly": ["residual adds unquantized (gemm_inputs_only)"],
        "dataset.calibration.size": 256,
        "method.params.weight_granularity": "per_tensor",
        "method.params.first_last": 8,
    })
    cmp = compare_cards([a, b])
    assert sorted(cmp.differences) == sorted(["per-channel vs per-tensor weights", "first/last layers FP32 vs 8-bit",
                                              "calibration 1024 vs 256 images"])
    assert cmp.method_differences == ["weight_granularity per-channel vs per-tensor", "first_last fp32 vs 8"]
    md = cmp.to_markdown()
    assert md.index("- per-channel vs per-tensor weights") < md.index("## Cards")   # above the table


def test_identical_settings_list_none_even_across_methods():
    a = ptq()
    # AdaRound instead of nearest rounding: the method's own choice, not a confounder
    b = the_same_run_with(a, **{"method.name": "adaround", "method.label": "adaround-w4a8",
                                "method.pipeline": ["fold_bn", "insert_quantizers", "adaround"],
                                "quantization.weights.rounding": "adaround",
                                "quantization.bias_correction": "none"})
    cmp = compare_cards([a, b])
    assert cmp.differences == []
    assert "method ptq vs adaround" in cmp.method_differences
    assert "nearest vs adaround rounding" in cmp.method_differences
    assert "None: the cards share every setting other than the method's own choices." in cmp.to_markdown()


def test_swept_axis_is_named():
    a = ptq()
    b = the_same_run_with(a, **{"quantization.weights.bits": 8, "method.params.weight_bits": 8})
    assert compare_cards([a, b]).differences == ["4-bit vs 8-bit weights"]


def test_spec_examples_of_confounders():
    a = ptq()
    b = the_same_run_with(a, **{
        "quantization.batch_norm": "kept",
        "quantization.residual_add": "gemm_inputs_only",
        "results.fp32": 69.68,
        "model.weights": "torchvision:ResNet18_Weights.IMAGENET1K_V2",
        "model.weights_sha256": "0" * 64,
        "dataset.eval_size": 10000,
        "cost.profile": "systolic-ws",
        "dataset.preprocessing.resize": 232,
        "quantization.weights.symmetric": False,
        "quantization.graph_mode": "eager",
    })
    a["quantization"]["residual_add"] = "quant_all"
    d = compare_cards([a, b]).differences
    for expected in ("BN folded vs kept", "residual adds unquantized in B", "different FP32 baselines (69.76 vs 69.68)",
                     "different eval size (50000 vs 10000 images)", "different cost profile (asic45 vs systolic-ws)",
                     "different preprocessing (resize 256 vs resize 232)", "symmetric vs asymmetric weights",
                     "fx vs eager graph mode"):
        assert expected in d, (expected, d)
    assert any(x.startswith("different weights source (torchvision:ResNet18_Weights.IMAGENET1K_V1") for x in d)
    assert len(d) == 9


def test_dataset_differences_and_grouping_of_many_cards():
    a = ptq()
    b = variant(a, **{"dataset.ref": "imagefolder:/data/imagenet-v2"})
    c = variant(a, **{"quantization.weights.granularity": "per_tensor"})
    d = compare_cards([a, b, c]).differences
    assert "different datasets (imagefolder:/data/imagenet (A, C) vs imagefolder:/data/imagenet-v2 (B))" in d
    assert "per-channel (A, B) vs per-tensor (C) weights" in d
    many = [variant(a, **{"dataset.calibration.size": 256 if i % 3 else 512}) for i in range(9)]
    assert compare_cards(many).differences == ["calibration 512 (A, D, G) vs 256 (6 cards) images"]


def test_failed_cards_listed_not_dropped():
    a, b = ptq(), the_same_run_with(ptq(), **{"quantization.weights.granularity": "per_tensor"})
    failed = variant(ptq(), status="failed", error="RuntimeError: shapes do not match", cost={}, method_stats={},
                     results={"metric": "top1", "seeds": [0]})
    failed["method"]["label"] = "broken"
    # by default a failed card is not a row: one short section after the table, its letter after the rows'
    cmp = compare_cards([a, failed, b])
    assert list(cmp.table["status"]) == ["ok", "ok"] and [r.card for r in cmp.rows] == ["A", "B"]
    assert cmp.failed == [{"card": "C", "path": None, "model": "torchvision:resnet18", "label": "broken",
                           "error": "RuntimeError: shapes do not match"}]
    assert cmp.differences == ["per-channel vs per-tensor weights"]   # failed cards carry no settings
    md = cmp.to_markdown()
    assert "broken |" not in md and "FAILED |" not in md
    assert "- C: torchvision:resnet18 · broken FAILED — RuntimeError: shapes do not match" in md
    assert json.loads(cmp.to_json())["failed"][0]["card"] == "C"
    # --all: failed cards are rows too, in the config's order
    every = compare_cards([a, failed, b], show_all=True)
    assert list(every.table["status"]) == ["ok", "failed", "ok"]
    assert every.failed[0]["card"] == "B" and 1 not in every.pareto
    assert every.differences == ["per-channel (A) vs per-tensor (C) weights"]
    md = every.to_markdown()
    assert "| B | torchvision:resnet18 | ptq | broken |" in md and "FAILED" in md


def test_failed_messages_are_short_in_the_text_and_whole_in_json():
    long = "RuntimeError: " + "x" * 600 + "\nTraceback line 2"
    failed = variant(ptq(), status="failed", error=long, cost={}, method_stats={}, results={"metric": "top1", "seeds": [0]})
    cmp = compare_cards([ptq(), failed])
    line = next(l for l in cmp.to_markdown().splitlines() if "FAILED —" in l)
    assert len(line) < 260 and line.endswith("…") and "Traceback" not in line
    assert json.loads(cmp.to_json())["failed"][0]["error"] == long


def test_table_columns_and_pareto_flags():
    a = ptq()
    b = the_same_run_with(a, **{"quantization.weights.bits": 8})
    b["cost"]["bops"] = a["cost"]["bops"] * 2
    b["results"]["quantized"] = a["results"]["quantized"] + 1
    cmp = compare_cards([a, b])
    t = cmp.table
    for col in ("card", "model", "method", "label", "w_bits", "a_bits", "granularity", "bn", "first_w_bits", "residual",
                "calibration", "fp32", "quantized", "std", "delta", "bops", "size_bits", "energy_pj",
                "latency_cycles", "profile", "pareto", "status"):
        assert col in t.columns, col
    assert list(t["card"]) == ["A", "B"] and list(t["w_bits"]) == [4, 8]
    assert list(t["first_w_bits"]) == [None, None] and list(t["calibration"]) == [1024, 1024]
    assert list(t["granularity"]) == ["per_channel", "per_channel"] and list(t["id"]) == [a["id"], b["id"]]
    assert cmp.pareto == [0, 1] and list(t["pareto"]) == [True, True]
    assert compare_cards([a, b], x="size").pareto == [1]     # same size, B more accurate: A is dominated
    assert card_letter(0) == "A" and card_letter(25) == "Z" and card_letter(26) == "AA" and card_letter(701) == "ZZ"


def test_exports():
    import pandas as pd
    a = ptq()
    a["model"]["ref"] = "<b>50%_{x}&y</b>"
    b = the_same_run_with(a, **{"quantization.batch_norm": "kept"})
    cmp = compare_cards([a, b])
    csv = cmp.to_csv()
    df = pd.read_csv(io.StringIO(csv))
    assert len(df) == 2 and list(df["bn"]) == ["folded", "kept"] and df["calibration"].tolist() == [1024, 1024]
    # raw values as the card stores them (no second vocabulary), with the card ids
    assert list(df["granularity"]) == ["per_channel", "per_channel"] and list(df["residual"]) == ["gemm_inputs_only"] * 2
    assert list(df["id"]) == [a["id"], b["id"]]
    data = json.loads(cmp.to_json())
    assert data["differences"] == ["BN folded vs kept"] and data["cards"][0]["quantized"] == 68.424
    assert data["difference_details"][0]["field"] == "quantization.batch_norm"
    assert data["cards"][0]["granularity"] == "per_channel" and data["cards"][0]["id"] == a["id"]
    assert "per-channel" not in json.dumps(data["cards"])
    tex = cmp.to_latex()
    assert r"\textless{}b\textgreater{}50\%\_\{x\}\&y\textless{}/b\textgreater{}" in tex and "50%_" not in tex
    assert r"\toprule" in tex and r"\bottomrule" in tex and "% confounding difference: BN folded vs kept" in tex
    md = cmp.export("md")
    assert r"\<b\>50%_{x}&y\</b\>" in md
    html = cmp.export("html")
    assert "&lt;b&gt;50%_{x}&amp;y&lt;/b&gt;" in html and "<b>50%" not in html and "per-channel" in html
    with pytest.raises(QcardError, match="allowed: md, csv, tex, json, html"):
        cmp.export("xlsx")


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_latex_export_compiles(tmp_path):
    a = ptq()
    a["model"]["ref"] = "<b>50%_{x}&y $#^~\\</b>"
    cmp = compare_cards([a, the_same_run_with(a, **{"quantization.batch_norm": "kept"})], reference="all")
    doc = ("\\documentclass{article}\n\\usepackage[margin=1cm,landscape]{geometry}\n\\usepackage{booktabs,graphicx}\n"
           "\\begin{document}\n\\tiny\n" + cmp.to_latex() + "\n\\end{document}\n")
    (tmp_path / "doc.tex").write_text(doc, encoding="utf-8")
    r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]


def test_reference_rows_separate_and_filtered():
    a = ptq()
    cmp = compare_cards([a], reference=True)
    ref = cmp.reference
    assert set(ref["model"]) == {"resnet18"} and set(ref["kind"]) == {"reported"} and len(ref) == 20
    assert len(cmp.table) == 1                       # measured rows untouched
    md = cmp.to_markdown()
    cards_at, reported_at = md.index("## Cards"), md.index("## Reported (published figures, not measured here)")
    assert cards_at < reported_at
    assert "| nagel2021 | ImageNet-1k | resnet18 | ptq-standard | W4A8 | per-channel | 69.68 | 68.91 | -0.77 |" in md[reported_at:]
    assert "nagel2021 |" not in md[:reported_at]
    assert "Nagel et al., A White Paper on Neural Network Quantization" in md
    csv = cmp.to_csv()
    measured, reported = csv.split("\n# reported")
    assert "nagel2021" not in measured and reported.count("nagel2021") == 6
    assert len(compare_cards([a], reference="all").reference) == len(reference_rows()) == 65
    other = variant(a, **{"model.ref": "qcard:lenet5"})
    none = compare_cards([other], reference=True)
    assert len(none.reference) == 0 and "--reference-all" in none.to_markdown()
    assert json.loads(compare_cards([a]).to_json())["reference"] is None


def test_reference_model_keys():
    assert model_key("torchvision:resnet18") == "resnet18"
    assert model_key("timm:resnet50.a1_in1k") == "resnet50"
    assert model_key("python:my.models:MobileNet_V2") == "mobilenet_v2"
    assert model_key("weights/mobilenet-v2.pt") == "mobilenet_v2"


def test_pareto_plot_png_and_pdf_with_embedded_fonts(tmp_path):
    a = ptq()
    b = the_same_run_with(a, **{"quantization.weights.bits": 8})
    cmp = compare_cards([a, b], x="energy")
    png, pdf, svg = cmp.plot(tmp_path / "front.pdf")
    assert png == tmp_path / "front.png" and pdf == tmp_path / "front.pdf" and svg == tmp_path / "front.svg"
    text = svg.read_text(encoding="utf-8")
    assert text.lstrip().startswith("<?xml") and "<svg" in text and "<script" not in text
    assert cmp.plot(tmp_path / "again")[2].read_bytes() == svg.read_bytes()     # same plot, same bytes
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF") and b"/FontFile2" in data      # TrueType fonts embedded (fonttype 42)
    assert b"/Type3" not in data and b"/Subtype /Type3" not in data
    marvin = json.loads((FIXTURES / "marvin_resnet8.json").read_text())
    with pytest.raises(QcardError, match="no card has both an accuracy and cost.energy_pj"):
        compare_cards([marvin], x="energy").plot(tmp_path / "x")
    with pytest.raises(QcardError, match="allowed: bops, size, energy, latency"):
        compare_cards([a], x="flops")


def test_load_cards_recursive_dedup_and_errors(tmp_path):
    root = tmp_path / "runs" / "exp"
    for i in range(3):
        (root / f"point{i}").mkdir(parents=True)
        shutil.copy(FIXTURES / "ptq_w4a8_resnet18.json", root / f"point{i}" / "card.json")
    (root / "point0" / "notes.json").write_text("{}")          # only card.json files are searched for
    cards = load_cards([tmp_path / "runs", root / "point1" / "card.json"])
    assert [c.path.parent.name for c in cards] == ["point0", "point1", "point2"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(QcardError, match="no card.json found under folder"):
        load_cards([tmp_path / "empty"])
    with pytest.raises(QcardError, match="no such card file or run folder"):
        load_cards([tmp_path / "nope.json"])
    bad = tmp_path / "bad" / "card.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps({"schema_version": "1", "id": "x"}))
    with pytest.raises(QcardError, match=r"bad/card.json: not a valid qcard card"):
        load_cards([bad])
    bad.write_text(json.dumps(dict(ptq(), schema_version="9")))
    with pytest.raises(QcardError, match="schema version '9' is not known"):
        load_cards([bad])


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_compare(tmp_path):
    root = tmp_path / "runs"
    for name in ("ptq_w4a8_resnet18", "sparq_resnet18"):
        (root / name).mkdir(parents=True)
        shutil.copy(FIXTURES / f"{name}.json", root / name / "card.json")
    r = run_cli("compare", root)
    assert r.exit_code == 0, r.output
    assert r.output.startswith("# Comparison of 2 cards") and "- BN folded vs kept" in r.output
    r = run_cli("compare", root, "--format", "json", "--output", tmp_path / "out" / "cmp.json",
                "--plot", tmp_path / "front", "--x", "size", "--reference")
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "out" / "cmp.json").read_text())
    assert data["x"] == "size" and len(data["cards"]) == 2 and data["reference"][0]["kind"] == "reported"
    assert (tmp_path / "front.png").is_file() and (tmp_path / "front.pdf").is_file()
    r = run_cli("compare", tmp_path / "missing")
    assert r.exit_code == 2 and "no such card file or run folder" in r.output
    r = run_cli("compare", root, "--x", "flops")
    assert r.exit_code == 2


def test_command_modules_import_light(subprocess_env):
    code = ("import sys, qcard.commands.compare, qcard.commands.render, qcard.cards.compare, qcard.cards.render\n"
            "heavy = [m for m in ('torch', 'pandas', 'matplotlib') if m in sys.modules]\n"
            "print(heavy)\nassert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_fp32_baseline_card_has_no_quantizer_details_to_differ():
    from qcard.cards.schema import unquantized_block
    base = variant(ptq(), **{"quantization": unquantized_block(), "method.name": "fp32", "method.family": "none",
                             "method.label": "fp32", "method.params": {}, "method.pipeline": [],
                             "dataset.calibration": None})
    cmp = compare_cards([base, ptq()])
    # the operating point and the cost profile differ; granularity, grids, BN, ... do not apply to FP32
    assert cmp.differences == ["FP32 vs 4-bit weights", "FP32 vs 8-bit activations"]
    assert cmp.method_differences == ["method fp32 vs ptq"]
    assert "| A | torchvision:resnet18 | fp32 | fp32 | FP32 |" in cmp.to_markdown()


ROOT = Path(__file__).resolve().parent.parent


def test_readme_energy_plot_reads_the_profile_that_has_energy(tmp_path):
    """Issue 15 item 6: the README's `qcard compare cards/quickstart --plot p --x energy` failed, as the
    published cards' main profile (bitops) has no energy; their asic45 profile has it."""
    r = CliRunner().invoke(main, ["compare", str(ROOT / "cards" / "quickstart"), "--plot",
                                                   str(tmp_path / "p"), "--x", "energy", "--format", "json"])
    assert r.exit_code == 0, r.output + r.stderr
    assert "cost from profile asic45" in r.stderr and (tmp_path / "p.png").is_file()
    data = json.loads(r.stdout)
    assert data["profile"] == "asic45" and all(c["profile"] == "asic45" for c in data["cards"])
    assert all(c["energy_pj"] > 0 for c in data["cards"])
    r = CliRunner().invoke(main, ["compare", str(ROOT / "cards" / "quickstart"), "--x", "bops",
                                                   "--profile", "nope"])
    assert r.exit_code == 2 and "profiles on these cards: asic45, bitops" in r.stderr


def test_named_profile_and_fallback_in_the_api():
    a = ptq()
    b = the_same_run_with(a, **{"quantization.weights.bits": 8})
    hw = {"profile": "npu", "energy_pj": 5.0, "latency_cycles": 10.0, "bops": 1.0}
    for c in (a, b):
        c["cost_profiles"] = {"npu": dict(hw)}
    main_energy = compare_cards([a, b], x="energy")       # the main profile has energy: kept
    assert main_energy.profile is None and main_energy.rows[0]["energy_pj"] == a["cost"]["energy_pj"]
    named = compare_cards([a, b], x="energy", profile="npu")
    assert named.profile == "npu" and [r["energy_pj"] for r in named.rows] == [5.0, 5.0]
    for c in (a, b):
        c["cost"]["energy_pj"] = None
    auto = compare_cards([a, b], x="energy")
    assert auto.profile == "npu" and "choose with --profile" in auto.profile_note
    assert "Cost columns: cost from profile npu" in auto.to_markdown()
    assert "Cost columns" not in main_energy.to_markdown()


def test_environment_differences_are_confounders():
    """Issue 15 item 7: the same config run on another CPU, commit, dirty tree and thread count differs
    by 0.4 points; compare must not say the cards share every setting."""
    a = ptq()
    a["provenance"].update(cpu="Intel(R) Xeon(R) Processor", git_commit="e49515180bb1a03c", git_dirty=False,
                           torch_threads=2)
    b = the_same_run_with(a, **{"provenance.cpu": "AMD EPYC 7B13", "provenance.git_commit": "99c67ca0aa11bb22",
                                "provenance.git_dirty": True, "provenance.torch_threads": 1})
    cmp = compare_cards([a, b])
    assert cmp.differences == ["different qcard commits (e49515180b vs 99c67ca0aa)",
                               "qcard source tree clean vs with uncommitted changes",
                               "different CPUs (Intel(R) Xeon(R) Processor vs AMD EPYC 7B13)",
                               "torch threads 2 vs 1"]
    assert "share every setting" not in cmp.to_markdown()
    c = the_same_run_with(a, **{"provenance.torch": "2.13.0"})
    (soft,) = compare_cards([a, c]).differences
    assert soft.startswith("different software (") and "torch 2.13.0" in soft


def test_provenance_records_torch_threads():
    import torch
    from qcard import provenance
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        prov = provenance.collect(seed=0, deterministic=True, config_sha256=None)
    finally:
        torch.set_num_threads(before)
    assert prov["torch_threads"] == 1
    from qcard.cards.schema import Provenance
    assert Provenance(**prov).torch_threads == 1


def test_csv_cells_are_guarded_against_formulas():
    """Issue 15 item 17: labels and paths come from users' files; a spreadsheet must not run them."""
    a = ptq()
    b = the_same_run_with(a, **{"method.label": "=HYPERLINK(\"http://x\")", "model.ref": "@SUM(A1)",
                                "quantization.weights.bits": 8})
    c = the_same_run_with(a, **{"method.label": "+cmd", "model.ref": "-2+3"})
    import csv
    rows = list(csv.DictReader(io.StringIO(compare_cards([a, b, c]).to_csv())))
    assert [r["label"] for r in rows] == [a["method"]["label"], "'=HYPERLINK(\"http://x\")", "'+cmd"]
    assert [r["model"] for r in rows][1:] == ["'@SUM(A1)", "'-2+3"]
    assert float(rows[1]["delta"]) < 0 and not rows[1]["delta"].startswith("'")   # numbers stay numbers
