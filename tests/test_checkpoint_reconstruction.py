"""Checkpoints inside reconstruction (issue #24 item 1): AdaRound (layer units) and QDrop (block units)
killed mid-unit and between units, rerun, and ending with the card of an uninterrupted run.

The engine (quant.reconstruct) saves after every unit and, on the Checkpointer's schedule, inside one; its
step counts iterations over the units. Here every unit runs 6 iterations with a save every 3 steps, so the
saves are at steps 3 (mid unit 1), 6 (unit 1 done), 9 (mid unit 2), 12 (unit 2 done), ...: the k-th save
of a process is mid-unit when k is odd (counted from where that process started) and between units when
k is even. `qcard:resnet8` has 10 layer units and 5 blocks.

The fault tests run real `qcard run` processes, SIGKILLed right after their k-th checkpoint write (the
QCARD_TEST_KILL_AFTER_CHECKPOINT hook), a few seconds each on an idle machine: marked slow. The in-process
tests at the end are cheap."""
import json
import os
from pathlib import Path

import pytest
import torch

from qcard.checkpoint import CHECKPOINT_GLOB, Checkpointer
from test_checkpoint_faults import _card_path, _flat, _killed, _run

ROOT = Path(__file__).resolve().parents[1]

SCHEME = "w_bits: 3, a_bits: 4, calibration_batch_size: 32"
PARAMS = {
    "adaround": f"{{pipeline: custom, steps: [weight_ranges, adaround, activation_ranges], adaround_iters: 6, "
                f"adaround_batch_size: 16, {SCHEME}}}",
    "qdrop": f"{{pipeline: qdrop, reconstruction: {{iters: 6, batch_size: 16, scale_lr: 1.0e-3}}, {SCHEME}}}",
}
UNITS = {"adaround": 10, "qdrop": 5}


def _config(tmp_path: Path, step: str) -> Path:
    path = tmp_path / f"{step}.yaml"
    path.write_text(f"""\
experiment: ckpt_{step}
models: [qcard:resnet8]
dataset: {{ref: qcard:mnist5k, eval_split: test, eval_size: 200, batch_size: 200, calibration: {{size: 64}}}}
cost: {{profiles: [bitops]}}
checkpoint: {{every_steps: 3}}
methods:
  - name: ptq
    params: {PARAMS[step]}
""")
    return path


def _comparable(card: dict) -> dict:
    """The card less what is measured rather than computed: the provenance's wall times, timestamps,
    memory peaks, the resume note and the command lines (as test_checkpoint_faults leaves out), and the
    reconstruction's wall times: `wall_s` of the step, `seconds` and `iter_s` of each unit, and the same
    figures where the card's section shows them (the table's "s" column, "wall … s" in its note)."""
    card = json.loads(json.dumps(card))
    for k in ("started_at", "finished_at", "wall_seconds", "timings", "resumed", "command", "memory"):
        card["provenance"].pop(k, None)
    card.pop("reproduce")
    for rec in card["method_stats"].values():
        if isinstance(rec, dict):
            rec.pop("wall_s", None)
            for row in rec.get("per_unit", []):
                row.pop("seconds"), row.pop("iter_s")
    for sec in card["sections"]:
        if sec["title"].endswith("reconstruction units"):
            sec["note"] = sec["note"].split("; wall ")[0] + sec["note"].split(" s. Loss")[1]
            assert sec["columns"][-1][0] == "s"
            sec["rows"] = [r[:-1] for r in sec["rows"]]
    return _flat(card)


def _differences(card: dict, ref: dict):
    a, b = _comparable(card), _comparable(ref)
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """step -> the card of an uninterrupted run (made once per step)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cards = {}

    def get(step: str) -> dict:
        if step not in cards:
            tmp = tmp_path_factory.mktemp(f"ref_{step}")
            r = _run(_config(tmp, step), tmp / "out", env=env)
            assert r.returncode == 0, r.stdout + r.stderr
            cards[step] = json.loads(_card_path(tmp / "out").read_text())
            assert cards[step]["provenance"]["resumed"] is None
            assert not list(_card_path(tmp / "out").parent.glob(CHECKPOINT_GLOB)), "checkpoints left behind"
        return cards[step]
    get.env = env
    return get


def _killed_then_resumed(step, reference, tmp_path, kills):
    """Run the point once per kill count (each killed after that many saves), then to the end; returns
    (its card, the stdout of every run)."""
    config, out, outs = _config(tmp_path, step), tmp_path / "out", []
    for n in kills:
        r = _run(config, out, kill_after=n, env=reference.env)
        assert _killed(r), r.stdout + r.stderr
        outs.append(r.stdout)
        folder = next(out.glob("*/*/point.yaml")).parent
        assert [p.name for p in folder.glob(CHECKPOINT_GLOB)] == [f"checkpoint-seed0-{step}.pt"]
        assert not (folder / "card.json").exists()
    done = _run(config, out, env=reference.env)
    assert done.returncode == 0, done.stdout + done.stderr
    outs.append(done.stdout)
    assert not list(_card_path(out).parent.glob(CHECKPOINT_GLOB)), "checkpoints are removed with the card"
    return json.loads(_card_path(out).read_text()), outs


@pytest.mark.slow
def test_adaround_killed_mid_layer_and_between_layers_ends_identical(reference, tmp_path):
    ref = reference("adaround")
    # the 1st save: step 3, mid layer 1; then from there the 3rd: steps 6, 9, 12 (layers 1 and 2 done)
    card, outs = _killed_then_resumed("adaround", reference, tmp_path, kills=[1, 3])
    assert "adaround: resumed from the checkpoint of step 3 (unit 1 of 10, iteration 3 of 6)" in outs[1]
    assert "adaround: resumed from the checkpoint of step 12 (2 of 10 units done)" in outs[2]
    assert card["provenance"]["resumed"] == [{"seed": 0, "stage": "adaround", "step": 12}]
    md = (_card_path(tmp_path / "out").parent / "card.md").read_text()
    assert "seed 0 resumed from the checkpoint of adaround of step 12" in md
    assert card["quantization"]["weights"]["rounding"] == "adaround"
    assert len(card["method_stats"]["adaround"]["layers"]) == UNITS["adaround"]
    assert _differences(card, ref) == []


@pytest.mark.slow
def test_qdrop_killed_between_blocks_and_mid_block_ends_identical(reference, tmp_path):
    ref = reference("qdrop")
    # the 4th save: step 12 (blocks 1 and 2 done); then from there the 3rd: steps 15, 18, 21 (mid block 4,
    # whose activation steps are learned and whose QDrop draws come from the restored generator)
    card, outs = _killed_then_resumed("qdrop", reference, tmp_path, kills=[4, 3])
    assert "qdrop: resumed from the checkpoint of step 12 (2 of 5 units done)" in outs[1]
    assert "qdrop: resumed from the checkpoint of step 21 (unit 4 of 5, iteration 3 of 6)" in outs[2]
    assert card["provenance"]["resumed"] == [{"seed": 0, "stage": "qdrop", "step": 21}]
    assert [u["unit"] for u in card["method_stats"]["qdrop"]["per_unit"]] == [
        u["unit"] for u in ref["method_stats"]["qdrop"]["per_unit"]]
    assert _differences(card, ref) == []


@pytest.mark.slow
def test_qdrop_killed_after_its_last_save_skips_the_loop_and_ends_identical(reference, tmp_path):
    ref = reference("qdrop")
    card, outs = _killed_then_resumed("qdrop", reference, tmp_path, kills=[10])     # step 30: all 5 blocks done
    assert "qdrop: resumed from the checkpoint of step 30 (5 of 5 units done)" in outs[1]
    assert card["provenance"]["resumed"] == [{"seed": 0, "stage": "qdrop", "step": 30}]
    assert _differences(card, ref) == []


@pytest.mark.slow
def test_corrupt_reconstruction_checkpoint_is_ignored_with_a_warning(reference, tmp_path):
    """A real checkpoint (from a killed run) with one byte changed: the rerun says so, starts from step 0
    and ends with the uninterrupted run's card; nothing of the file is loaded."""
    ref = reference("qdrop")
    config, out = _config(tmp_path, "qdrop"), tmp_path / "out"
    assert _killed(_run(config, out, kill_after=3, env=reference.env))
    (ckpt,) = out.glob(f"*/*/{CHECKPOINT_GLOB}")
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    done = _run(config, out, env=reference.env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"checkpoint {ckpt} ignored" in done.stdout and "truncated or corrupt" in done.stdout
    assert "starts from step 0" in done.stdout and "resumed" not in done.stdout
    card = json.loads(_card_path(out).read_text())
    assert card["provenance"]["resumed"] is None
    assert _differences(card, ref) == []


# ------------------------------------------------------------------ in-process (cheap)

class Stop(Exception):
    pass


SETTINGS = {
    "qdrop": dict(unit="block", drop=True, scale_lr=1e-3),
    # qcard's AdaRound before the engine: its "FP" inputs come from the model rounded so far, which a
    # resumed run must have put back exactly
    "adaround_rounded_so_far": dict(unit="layer", input="fp_activations", quant_activations=False,
                                    targets="rounded_so_far", label="adaround"),
}


def _engine(kind="qdrop", ck=None, stop_after=None):
    """The engine on resnet8 (W3A4); (weights, activation grids and FP weights, per-unit rows less times
    and rounding labels), or None when stopped right after the stop_after-th save (as a kill would)."""
    from qcard.quant.calibrate import sim_info
    from qcard.quant.reconstruct import Settings, reconstruct
    from test_reconstruction import _grids, _sim
    torch.set_num_threads(1)
    sim, batches = _sim("resnet8", w_bits=3, a_bits=4)
    if stop_after is not None:
        save = ck.save

        def save_then_stop(step, state):
            save(step, state)
            if ck.saves == stop_after:
                raise Stop
        ck.save = save_then_stop
    try:
        rec = reconstruct(sim, batches, Settings(iters=6, batch_size=16, **SETTINGS[kind]), seed=11, checkpoint=ck)
    except Stop:
        return None
    rows = [{k: v for k, v in u.items() if k not in ("seconds", "iter_s")} for u in rec["per_unit"]]
    layers = sim_info(sim).gemm_layers()
    # what is not in state_dict: the FP weights (bias correction reads them) and the rounding labels
    fp = [li.module.__dict__["qcard_fp_weight"] for li in layers]
    return _grids(sim) + fp, rows + [li.weight_quantizer.rounding_label for li in layers]


@pytest.fixture(scope="module")
def engine_reference():
    """kind -> the result of an uninterrupted run (made once per kind)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = _engine(kind)
        return cache[kind]
    return get


def _same(a, b) -> bool:
    return len(a[0]) == len(b[0]) and all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and a[1] == b[1]


@pytest.mark.parametrize("kind,stop_after,step", [("qdrop", 3, 9),                  # mid block 2
                                                  ("qdrop", 6, 18),                 # blocks 1-3 done
                                                  ("adaround_rounded_so_far", 5, 15)])    # mid layer 3
def test_in_process_resume_is_bit_identical(engine_reference, tmp_path, kind, stop_after, step):
    assert _engine(kind, Checkpointer(tmp_path, "s0", "fp", every_steps=3), stop_after) is None
    ck = Checkpointer(tmp_path, "s0", "fp", every_steps=3)
    got = _engine(kind, ck)
    assert ck.resumed() == [{"step": step}]
    assert _same(got, engine_reference(kind))


def test_a_saved_loop_that_does_not_fit_is_undone_and_the_run_starts_over(engine_reference, tmp_path):
    """A checkpoint of this run's fingerprint whose loop state does not fit the unit (a rounding tensor of
    another shape): the model of the units done, already put back, is rolled back; a warning; from step 0."""
    assert _engine("qdrop", Checkpointer(tmp_path, "s0", "fp", every_steps=3), 3) is None    # mid block 2 (step 9)
    ck = Checkpointer(tmp_path, "s0", "fp", every_steps=3)
    state = ck.load()
    assert state["loop"] is not None and state["model"] is not None
    state["loop"]["v"][0] = torch.zeros(3)
    ck.save(9, state)
    logs = []
    ck = Checkpointer(tmp_path, "s0", "fp", every_steps=3, log=logs.append)
    got = _engine("qdrop", ck)
    assert ck.resumed() == []
    assert any("does not fit this run" in m and "starts from step 0" in m for m in logs), logs
    assert _same(got, engine_reference("qdrop"))
