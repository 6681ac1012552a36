"""Peak memory of a point on its card (issue #24 item 4): measured per point, not per process."""
from __future__ import annotations

import json
import time

import pytest

from qcard.cards.render import render_card
from qcard.provenance import PeakMemory, rss_bytes


def test_rss_is_read():
    rss = rss_bytes()
    assert rss is not None and rss > 10e6           # a Python process with torch imported holds more than 10 MB


def test_peak_of_a_block_sees_a_short_allocation():
    """A 200 MB buffer held for a moment inside the block, freed before it ends: the block's peak has it,
    a later block's peak does not (ru_maxrss, the process's maximum since start, would)."""
    np = pytest.importorskip("numpy")
    with PeakMemory(interval_s=0.01) as big:
        buf = np.ones(25_000_000)                   # 200 MB, touched
        time.sleep(0.1)
        del buf
    with PeakMemory(interval_s=0.01) as small:
        time.sleep(0.05)
    b, s = big.record(), small.record()
    assert b["peak_rss_mb"] - b["rss_start_mb"] > 150
    assert s["peak_rss_mb"] - s["rss_start_mb"] < 50
    assert s["peak_rss_mb"] < b["peak_rss_mb"] - 100
    assert b["peak_gpu_mb"] is None and "/proc/self/statm" in b["how"]


def test_card_records_and_shows_memory_and_loading(tmp_path, write_config):
    from qcard.runner import run
    cfg = write_config("experiment: mem\nmodels: [qcard:lenet5]\ndataset: {ref: qcard:mnist5k, eval_size: 60, "
                       "calibration: {size: 32}}\nmethods:\n  - {name: ptq, params: {w_bits: 8, a_bits: 8, "
                       "pipeline: minmax}}\n")
    summary = run(str(cfg), out=str(tmp_path / "runs"), progress=False)
    assert summary.ok
    folder = next((tmp_path / "runs" / "mem").glob("*__ptq__*"))
    prov = json.loads((folder / "card.json").read_text())["provenance"]
    mem, dl = prov["memory"], prov["data_loading"]
    assert mem["peak_rss_mb"] >= mem["rss_start_mb"] > 10
    assert dl == {"setting": "auto", "num_workers": 0, "pin_memory": False, "persistent_workers": True,
                  "cores": dl["cores"]}
    md = (folder / "card.md").read_text()
    assert f"Peak memory of this point: {mem['peak_rss_mb']:.0f} MB resident" in md
    assert "Data loading: 0 worker process(es) (num_workers: auto)." in md
    # a card written before these fields renders without the lines
    card = json.loads((folder / "card.json").read_text())
    del card["provenance"]["memory"], card["provenance"]["data_loading"]
    old = render_card(card, "md")
    assert "Peak memory" not in old and "Data loading" not in old


def test_a_cpu_point_names_no_gpu_even_where_one_is_available(monkeypatch):
    import torch
    from qcard import provenance
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: f"Fake GPU {i}")
    assert provenance.gpu_name("cpu") is None
    assert provenance.collect(seed=0, deterministic=True, config_sha256=None, device="cpu")["gpu"] is None
    assert provenance.gpu_name("cuda") == "Fake GPU 0" and provenance.gpu_name("cuda:1") == "Fake GPU 1"
