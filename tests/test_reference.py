"""The shipped published rows (qcard/cards/literature.yaml, issue #23 item 5): every row loads with its
source, the MQBench and QDrop reconstruction rows reach ImageNet cards, a source's unstated FP32 or
granularity stays unstated, and real-engine figures (runtime-...) are kept apart from the simulated rows:
never in the reported table, CSV/JSON section or Pareto plot, only beside deploy results."""
import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from qcard.cards.compare import compare_cards, load_cards
from qcard.cards.compare.display import reference_cells
from qcard.cards.reference import (IMAGENET, LITERATURE, NOT_STATED, RUNTIME_PREFIX, card_dataset, model_key,
                                   reference_rows, reference_sources, runtime_reference_rows)
from qcard.errors import QcardError

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "cards" / "ptq_w4a8_resnet18.json"
RECONSTRUCTION = ROOT / "configs" / "imagenet" / "reconstruction.yaml"
MODELS = ("resnet18", "resnet50", "mobilenet_v2")


def shipped():
    return yaml.safe_load(LITERATURE.read_text(encoding="utf-8"))


def imagenet_card():
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def deployed(card, top1, sim):
    c = copy.deepcopy(card)
    c["deployment"] = {"status": "ok", "runtime": "onnxruntime", "runtime_version": "1.20.1", "top1": top1,
                       "top1_simulated": sim}
    return c


def find(rows, **keys):
    return [r for r in rows if all(r.get(k) == v for k, v in keys.items())]


def test_every_shipped_row_loads_with_its_source_cited():
    data = shipped()
    raw, sources = data["rows"], data["sources"]
    simulated, runtime = reference_rows(), runtime_reference_rows()
    assert len(simulated) + len(runtime) == len(raw) and runtime and simulated
    assert reference_sources() == sources
    for r in simulated + runtime:
        assert r["citation"] == sources[r["source"]] and r["dataset"] == data["dataset"] == IMAGENET
        assert r["kind"] == ("runtime" if r["method"].startswith(RUNTIME_PREFIX) else "reported")
    assert {r["source"] for r in raw} == set(sources)          # no source listed without a row
    # every row as written in the file, each loaded once with its values unchanged
    for x in raw:
        assert sum(all(r[k] == x[k] for k in x) for r in simulated + runtime) == 1, x


def test_unstated_fp32_and_granularity_stay_unstated():
    simulated, runtime = reference_rows(), runtime_reference_rows()
    raw = shipped()["rows"]
    no_gran = [r for r in simulated if r["w_granularity"] is None]
    # rows whose source states no granularity (AIMET zoo, Brevitas, PD-Quant) load; nothing is guessed
    assert {r["source"] for r in no_gran} == {x["source"] for x in raw if "w_granularity" not in x
                                             and not x["method"].startswith(RUNTIME_PREFIX)}
    assert all(r["fp32"] is None and r["delta"] is None for r in runtime)
    for r in simulated:
        assert r["delta"] == round(r["top1"] - r["fp32"], 2)
    cells, _ = reference_cells(runtime + no_gran[:1])
    assert cells[0][5] == NOT_STATED and cells[0][6] == "—" and cells[0][8] == "—"
    assert cells[-1][5] == NOT_STATED and cells[-1][8] == f"{no_gran[0]['delta']:+.2f}"


def test_mqbench_adaround_w4a4_rows_are_per_channel():
    rows = find(reference_rows(), source="mqbench", method="adaround", w_bits=4, a_bits=4)
    assert {r["model"] for r in rows} >= set(MODELS)
    assert {r["w_granularity"] for r in rows} == {"per_channel"}


def test_reconstruction_rows_at_w4a4_and_w2a4_for_imagenet_cards():
    card = imagenet_card()
    assert card_dataset(card["dataset"]) == IMAGENET
    for model in MODELS:
        rows = reference_rows([f"torchvision:{model}"], datasets=[card_dataset(card["dataset"])])
        for w in (4, 2):
            for method in ("adaround", "brecq", "qdrop"):
                got = find(rows, source="mqbench", method=method, w_bits=w, a_bits=4, w_granularity="per_channel")
                assert len(got) == 1, (model, method, w)
            assert len(find(rows, source="qdrop_repo", method="qdrop", w_bits=w, a_bits=4)) == 1, (model, w)
    # the transcription of MQBench's resnet18 table (published figures, FP32 71.06)
    r18 = {(r["method"], r["w_bits"]): r for r in find(reference_rows(["resnet18"]), source="mqbench", a_bits=4)}
    assert [r18[(m, 4)]["top1"] for m in ("adaround", "brecq", "qdrop")] == [68.67, 68.52, 68.84]
    assert [r18[(m, 2)]["top1"] for m in ("adaround", "brecq", "qdrop")] == [62.31, 63.56, 64.49]
    assert {r["fp32"] for r in r18.values()} == {71.06}
    # not beside a run on another dataset
    assert reference_rows(["resnet18"], datasets=["imagefolder:/data/three (3 classes)"]) == []


def test_reconstruction_config_gets_mqbench_and_qdrop_rows():
    cfg = yaml.safe_load(RECONSTRUCTION.read_text(encoding="utf-8"))
    dataset = card_dataset({"ref": cfg["dataset"]["ref"]})
    assert dataset == IMAGENET
    models = [m["ref"] for m in cfg["models"]]
    rows = reference_rows(models=models, datasets=[dataset])
    for m in cfg["methods"]:
        if m.get("label") not in ("adaround", "brecq", "qdrop"):
            continue
        p = m["params"]
        for model in models:
            for w in p["w_bits"]:
                got = find(rows, source="mqbench", model=model_key(model), method=m["label"], w_bits=w,
                           a_bits=p["a_bits"], w_granularity=p["w_granularity"])
                assert len(got) == 1, (model, m["label"], w)
                if m["label"] == "qdrop":
                    assert find(rows, source="qdrop_repo", model=model_key(model), method="qdrop", w_bits=w,
                                a_bits=p["a_bits"], w_granularity=p["w_granularity"]), (model, w)
    assert not any(r["method"].startswith(RUNTIME_PREFIX) for r in rows)


def test_runtime_rows_never_among_the_simulated_rows():
    assert runtime_reference_rows() and not any(r["method"].startswith(RUNTIME_PREFIX) for r in reference_rows())
    assert all(r["kind"] == "runtime" for r in runtime_reference_rows())
    # a card without a deploy result: the simulated rows only, and a note where runtime figures exist
    cmp = compare_cards([imagenet_card()], reference=True)
    assert cmp.reference_rows and set(cmp.reference["kind"]) == {"reported"}
    assert cmp.runtime_reference_rows == [] and "shown only beside deploy results" in cmp.runtime_reference_note
    trt = {r["source"] for r in runtime_reference_rows()}
    for fmt in ("md", "csv", "json", "html", "tex"):
        text = cmp.export(fmt)
        assert not any(s in text for s in trt), fmt
    assert "runtime" not in {r["kind"] for r in json.loads(cmp.to_json())["reference"]}


def test_runtime_rows_labelled_beside_deploy_results():
    card = deployed(imagenet_card(), top1=60.0, sim=60.1)
    cmp = compare_cards([card], reference=True)
    want = runtime_reference_rows([card["model"]["ref"]], datasets=[IMAGENET])
    assert want and cmp.runtime_reference_rows == want
    assert len(cmp.runtime_reference) == len(want) and set(cmp.runtime_reference["kind"]) == {"runtime"}
    assert not any(r["kind"] == "runtime" for r in cmp.reference_rows)
    assert cmp.pareto == [0] and len(cmp.rows) == 1            # the Pareto front is over the cards only
    md = cmp.to_markdown()
    sim_at = md.index("## Reported (published figures, not measured here)")
    run_at = md.index("## Reported runtime (real INT8 engine, not a simulation)")
    assert sim_at < run_at
    for r in want:
        line = f"| {r['source']} | {IMAGENET} | {r['model']} | {r['method']} | W{r['w_bits']}A{r['a_bits']} |"
        assert line in md[run_at:] and line not in md[:run_at]
        assert r["citation"] in md[run_at:]
    csv = cmp.to_csv()
    measured, rest = csv.split("\n# reported: ", 1)
    reported, runtime = rest.split("\n# reported runtime: ", 1)
    assert "not a simulation" in runtime.splitlines()[0]
    for r in want:
        assert r["source"] not in measured + reported and f"runtime,{r['source']}," in runtime
    data = json.loads(cmp.to_json())
    assert [r["method"] for r in data["reference_runtime"]] == [r["method"] for r in want]
    assert all(r["kind"] == "reported" for r in data["reference"])
    html = cmp.to_html()
    assert html.index("Reported runtime (real INT8 engine, not a simulation)") > html.index("Reported (published")
    html5lib = pytest.importorskip("html5lib")
    html5lib.HTMLParser(strict=True).parseFragment(html)
    tex = cmp.to_latex()
    assert "real INT8 engines (published, not measured here, not a simulation)" in tex
    # every runtime row with --reference-all, still apart
    every = compare_cards([card], reference="all")
    assert every.runtime_reference_rows == runtime_reference_rows()
    assert not any(r["kind"] == "runtime" for r in every.reference_rows)


def test_no_runtime_rows_for_a_deploy_result_on_another_dataset_or_model():
    three = deployed(imagenet_card(), top1=90.0, sim=90.0)
    three["dataset"].update(ref="imagefolder:/data/three_classes", eval_size=300,
                            split_info={"num_classes": 3, "class_map": {"kind": "imagenet", "folder_classes": 3,
                                                                        "model_classes": 1000}})
    assert compare_cards([three], reference=True).runtime_reference_rows == []
    lenet = deployed(imagenet_card(), top1=90.0, sim=90.0)
    lenet["model"]["ref"] = "qcard:lenet5"
    cmp = compare_cards([lenet], reference=True)
    assert cmp.runtime_reference_rows == [] and cmp.runtime_reference_note == ""
    assert compare_cards([lenet]).runtime_reference_rows is None           # not asked for


def test_site_shows_runtime_rows_apart(tmp_path):
    from qcard.site.build import build_site
    card = deployed(imagenet_card(), top1=60.0, sim=60.1)
    path = tmp_path / "run" / "card.json"
    path.parent.mkdir()
    path.write_text(json.dumps(card), encoding="utf-8")
    out = build_site(load_cards([path]), tmp_path / "site").out
    page = next(out.glob("experiments/*/index.html")).read_text(encoding="utf-8")
    sim_at = page.index("Published figures (reported, not measured here)")
    run_at = page.index("Reported runtime (real INT8 engine, not a simulation)")
    for r in runtime_reference_rows(["resnet18"], datasets=[IMAGENET]):
        assert f"<td>{r['method']}</td>" in page[run_at:] and f"<td>{r['method']}</td>" not in page[sim_at:run_at]
        assert r["citation"] in page[run_at:]
    html5lib = pytest.importorskip("html5lib")
    html5lib.HTMLParser(strict=True).parse(page)


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_latex_with_runtime_rows_compiles(tmp_path):
    cmp = compare_cards([deployed(imagenet_card(), top1=60.0, sim=60.1)], reference=True)
    tex = cmp.to_latex()
    assert "runtime-int8-tensorrt" in tex and "not stated & --- &" in tex
    doc = ("\\documentclass{article}\n\\usepackage[margin=1cm,landscape]{geometry}\n"
           "\\usepackage{booktabs,graphicx}\n\\begin{document}\n\\tiny\n" + tex + "\n\\end{document}\n")
    (tmp_path / "doc.tex").write_text(doc, encoding="utf-8")
    r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]


def write(tmp_path, rows, sources=None):
    path = tmp_path / "lit.yaml"
    path.write_text(yaml.safe_dump({"dataset": IMAGENET, "sources": sources or {"s": "Someone (2024)"},
                                    "rows": rows}), encoding="utf-8")
    return path


def test_loader_errors_name_the_row_and_the_allowed_values(tmp_path):
    base = {"source": "s", "model": "resnet18", "method": "ptq", "w_bits": 4, "a_bits": 8, "top1": 60.0}
    ok = write(tmp_path, [dict(base, fp32=70.0, w_granularity="per_channel"), base])
    rows = reference_rows(path=ok)
    assert [r["delta"] for r in rows] == [-10.0, None] and rows[1]["w_granularity"] is None
    cases = [({k: v for k, v in base.items() if k != "top1"}, "rows[0] lacks top1"),
             (dict(base, w_granularity="per_row"), "per_tensor, per_channel, per_group"),
             (dict(base, granularity="per_channel"), "unknown keys granularity"),
             (dict(base, top1="69"), "top1 must be a percentage"),
             (dict(base, w_bits=0), "w_bits must be a positive whole number"),
             (dict(base, source="other"), "names source 'other'")]
    for i, (row, words) in enumerate(cases):
        sub = tmp_path / str(i)
        sub.mkdir()
        with pytest.raises(QcardError, match=words.replace("[", r"\[")):
            reference_rows(path=write(sub, [row]))
