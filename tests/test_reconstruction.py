"""The reconstruction engine (AdaRound, BRECQ, QDrop), block detection and GPTQ, on small models and the
bundled zoo (qcard:resnet8, qcard:mobilenet_tiny; qcard:mnist5k calibration images), tiny iteration counts."""
import copy

import pytest
import torch
import torch.nn.functional as F

from qcard.quant.adaround import adaround
from qcard.quant.blocks import block_units, layer_units
from qcard.quant.calibrate import calibrate_activations, set_weight_ranges, sim_info
from qcard.quant.gptq import gptq, gptq_rows
from qcard.quant.graph import build_simulated
from qcard.quant.layerwise import capture_inputs, layer_forward, weight_rows
from qcard.quant.reconstruct import Settings, reconstruct
from qcard.quant.scheme import SimScheme
from test_ptq_algorithms import _build, _chain
from test_quant_support import bundled, mnist, one_thread


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


# ------------------------------------------------------------------ AdaRound: the seam

def _frozen_adaround_v1(model, batches, iters, batch_size, seed=0, reg=0.01, lr=1e-3):
    """qcard's AdaRound before the engine, kept verbatim in substance as the reference: "FP" inputs
    captured with the weight quantizers off (but upstream weights already hold rounded values)."""
    from qcard.quant.calibrate import quant_state
    info = sim_info(model)
    gen = torch.Generator().manual_seed(seed)
    for li in [l for l in info.gemm_layers() if l.weight_quantizer is not None]:
        m, wq = li.module, li.weight_quantizer
        with quant_state(model, weights=False, activations=False):
            x_fp = torch.cat(capture_inputs(model, m, batches))
        with quant_state(model, activations=False):
            x_q = torch.cat(capture_inputs(model, m, batches))
        act = {"relu": torch.relu, "relu6": F.relu6}.get(m.qcard_act, lambda y: y)
        w = m.weight.detach().clone()
        rows, s, z, back = weight_rows(w, wq)
        inv = 1.0 / s
        w_floor = torch.floor(rows * inv)
        rest = (rows * inv - w_floor).clamp(0.0, 1.0)
        v = (-torch.log((1.1 + 0.1) / (rest + 0.1) - 1).clamp(-30, 30)).detach().requires_grad_(True)
        opt = torch.optim.Adam([v], lr=lr)
        with torch.no_grad():
            target = act(layer_forward(m, x_fp, w))

        def soft(h):
            return back(s * (torch.clamp(w_floor + h + z, wq.qmin, wq.qmax) - z))

        n, warm = x_q.shape[0], int(0.2 * iters)
        for i in range(iters):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
            h = torch.clamp(torch.sigmoid(v) * 1.2 - 0.1, 0.0, 1.0)
            loss = (act(layer_forward(m, x_q[idx], soft(h))) - target[idx]).pow(2).flatten(1).sum(1).mean()
            if i >= warm:
                beta = 2.0 + 18.0 * max(0.0, 1.0 - (i - warm) / max(1, iters - warm))
                loss = loss + reg * (1 - (2 * h - 1).abs().pow(beta)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            m.weight.copy_(soft((v >= 0).to(rows.dtype)))


def _chain_sim(x):
    sim = _build(_chain(), x, w_bits=3, a_bits=None, w_granularity="per_tensor")
    set_weight_ranges(sim)
    return sim


def _weights(sim):
    return [li.module.weight.detach().clone() for li in sim_info(sim).gemm_layers()]


def test_engine_with_the_old_objective_reproduces_the_old_adaround_bit_for_bit():
    x = torch.rand(64, 3, 8, 8)
    ref = _chain_sim(x)
    _frozen_adaround_v1(ref, list(x.split(16)), iters=120, batch_size=16)
    old = _chain_sim(x)
    stats = adaround(old, list(x.split(16)), iters=120, batch_size=16, targets="rounded_so_far")
    assert all(torch.equal(a, b) for a, b in zip(_weights(ref), _weights(old)))
    # the old objective's flaw, measured: after the first layer its "FP" input is the quantized one
    assert [l["input_gap"] == 0.0 for l in stats["layers"]] == [True] * 4


def test_adaround_default_is_the_documented_objective():
    x = torch.rand(64, 3, 8, 8)
    new = _chain_sim(x)
    stats = adaround(new, list(x.split(16)), iters=120, batch_size=16)
    assert stats["targets"] == "fp_model"
    gaps = [l["input_gap"] for l in stats["layers"]]
    assert gaps[0] == 0.0 and all(g > 1e-3 for g in gaps[1:]), gaps     # FP targets from the untouched copy
    old = _chain_sim(x)
    adaround(old, list(x.split(16)), iters=120, batch_size=16, targets="rounded_so_far")
    assert any(not torch.equal(a, b) for a, b in zip(_weights(new), _weights(old)))


# ------------------------------------------------------------------ units on the captured graph

def _sim(name, w_bits=4, a_bits=4, n=64):
    xtr, _, _, _ = mnist()
    model = bundled(name)
    sim = build_simulated(model, SimScheme(w_bits=w_bits, a_bits=a_bits, w_granularity="per_channel",
                                           weight_range="mse", activation_range="mse"),
                          xtr[:1], log=lambda m: None)
    batches = list(xtr[:n].split(32))
    set_weight_ranges(sim)
    if a_bits is not None:
        calibrate_activations(sim, batches)
    return sim, batches


def test_blocks_of_resnet8_are_its_residual_blocks():
    sim, _ = _sim("resnet8")
    units = [(u.kind, u.layers) for u in block_units(sim)]
    assert units == [("layer", ["conv1"]),
                     ("residual", ["layer1.conv1", "layer1.conv2"]),
                     ("residual", ["layer2.shortcut.0", "layer2.conv1", "layer2.conv2"]),
                     ("residual", ["layer3.shortcut.0", "layer3.conv1", "layer3.conv2"]),
                     ("layer", ["fc"])]
    assert [u.layers for u in layer_units(sim)] == [[li.name] for li in sim_info(sim).gemm_layers()]


def test_blocks_of_mobilenet_tiny_are_inverted_residuals_and_runs_of_three():
    sim, _ = _sim("mobilenet_tiny")
    units = [(u.kind, u.layers) for u in block_units(sim)]
    assert units == [("block", ["stem.0", "block1.dw.0", "block1.pw.0"]),
                     ("residual", ["block2.expand.0", "block2.dw.0", "block2.project.0"]),
                     ("block", ["block3.dw.0", "block3.pw.0"]),
                     ("residual", ["block4.expand.0", "block4.dw.0", "block4.project.0"]),
                     ("layer", ["fc"])]
    assert [u.layers for u in block_units(sim, max_layers=1)][0] == ["stem.0"]


# ------------------------------------------------------------------ BRECQ and QDrop

def _grids(sim):
    info = sim_info(sim)
    return _weights(sim) + [q.scale.detach().clone() for q in info.act_quantizers.values()]


def test_brecq_lowers_the_loss_of_every_block():
    sim, batches = _sim("resnet8", w_bits=3, a_bits=4)
    scales = {k: q.scale.detach().clone() for k, q in sim_info(sim).act_quantizers.items()}
    rec = reconstruct(sim, batches, Settings(unit="block", iters=60, batch_size=16, scale_lr=1e-3), seed=1005)
    learned = [k for k, q in sim_info(sim).act_quantizers.items() if not torch.equal(q.scale, scales[k])]
    assert "layer1.conv1.output" in learned and "input" not in learned, learned     # the net input is no unit's
    assert [u["unit"] for u in rec["per_unit"]][1] == "layer1.conv1..layer1.conv2"
    for u in rec["per_unit"]:
        assert u["loss_after"] < u["loss_nearest"], u
        assert u["loss_last_iters"] < u["loss_first_iters"], u
    for li in sim_info(sim).gemm_layers():                      # hardened onto the frozen grid
        w = li.module.weight.detach()
        assert torch.equal(li.weight_quantizer(w), w) and li.weight_quantizer.estimator is None
    assert all(q.estimator is None for q in sim_info(sim).act_quantizers.values())


def test_qdrop_with_keep_probability_one_is_brecq_and_below_one_is_not():
    sim0, batches = _sim("mobilenet_tiny", w_bits=3, a_bits=4)
    sim1, sim2 = copy.deepcopy(sim0), copy.deepcopy(sim0)
    for s in (sim1, sim2):
        s.qcard_sim = copy.deepcopy(sim0.qcard_sim, {id(m): m2 for m, m2 in zip(sim0.modules(), s.modules())})
    common = dict(unit="block", iters=25, batch_size=16)
    reconstruct(sim0, batches, Settings(**common), seed=3)
    reconstruct(sim1, batches, Settings(drop=True, drop_prob=1.0, **common), seed=3)
    reconstruct(sim2, batches, Settings(drop=True, drop_prob=0.5, **common), seed=3)
    g0, g1, g2 = _grids(sim0), _grids(sim1), _grids(sim2)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert any(not torch.equal(a, b) for a, b in zip(g0, g2))


def test_settings_are_checked():
    sim, batches = _sim("resnet8", a_bits=None)
    with pytest.raises(ValueError, match="unit: 'blocks' is not one of layer, block"):
        reconstruct(sim, batches, Settings(unit="blocks", iters=1))


# ------------------------------------------------------------------ GPTQ

def test_gptq_with_uncorrelated_inputs_is_nearest_rounding():
    torch.manual_seed(0)
    w = torch.randn(6, 10)
    s = (w.abs().amax(1, keepdim=True) / 7)
    z = torch.zeros(6, 1)
    h = 2 * torch.eye(10)                                       # no correlations: nothing to compensate
    q = gptq_rows(w, h, s, z, -8, 7, block=4)
    assert torch.allclose(q, s * torch.clamp(torch.round(w / s), -8, 7), atol=1e-6)
    # correlated inputs: the error is pushed to later columns, so the result differs from nearest
    x = torch.randn(10, 200)
    x[1] = x[0] + 0.1 * x[1]
    q2 = gptq_rows(w, 2 * x @ x.t() / 200, s, z, -8, 7, block=4)
    near = s * torch.clamp(torch.round(w / s), -8, 7)
    assert not torch.equal(q2, near)
    assert float(((w - q2) @ x).pow(2).sum()) < float(((w - near) @ x).pow(2).sum())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_nearest_on_every_layer_output(act_order):
    sim, batches = _sim("resnet8", w_bits=3, a_bits=None)
    rec = gptq(sim, batches, act_order=act_order)
    rows = rec["layers"]
    assert len(rows) == len(sim_info(sim).gemm_layers()) and not any("skipped" in r for r in rows)
    for r in rows:
        assert r["output_err_gptq"] < r["output_err_nearest"], r
    for li in sim_info(sim).gemm_layers():
        w = li.module.weight.detach()
        assert torch.equal(li.weight_quantizer(w), w) and li.weight_quantizer.rounding_label == "gptq"


# ------------------------------------------------------------------ the ptq method's steps and card

@pytest.mark.parametrize("pipeline,rounding", [("qdrop", "adaround"), ("gptq", "gptq")])
def test_ptq_pipelines_run_and_their_card_sections_validate(pipeline, rounding):
    from qcard.methods.base import card_sections_of
    from qcard.methods.ptq import PTQ
    from test_quant_support import run_ptq
    extra = {"reconstruction": {"iters": 8, "batch_size": 16}} if pipeline == "qdrop" else {"gptq": {"act_order": True}}
    r = run_ptq(bundled("resnet8"), calibration_size=64, w_bits=3, a_bits=4, pipeline=pipeline, **extra)
    assert r.pipeline == ["weight_ranges", "activation_ranges", pipeline]
    assert r.quantization["weights"]["rounding"] == rounding
    sections = card_sections_of(PTQ(), r.stats)
    assert sections and sections[0]["kind"] == "table" and sections[0]["title"].startswith(pipeline)
    if pipeline == "qdrop":
        rec = r.stats["qdrop"]
        assert rec["drop"] and rec["drop_prob"] == 0.5 and rec["iters"] == 8
        assert [u["first"] for u in rec["units"]] == ["conv1", "layer1.conv1", "layer2.shortcut.0",
                                                       "layer3.shortcut.0", "fc"]
        assert len(sections[0]["rows"]) == 5


def test_new_ptq_settings_are_validated_and_stay_out_of_the_id_while_unset():
    from pydantic import ValidationError
    from qcard.methods.ptq.params import PTQParams
    p = PTQParams(w_bits=4, a_bits=4, pipeline="brecq")
    dump = p.model_dump(mode="json")
    assert "reconstruction" not in dump and "gptq" not in dump
    assert p.steps == ["weight_ranges", "activation_ranges", "brecq"]
    q = PTQParams(w_bits=4, a_bits=4, pipeline="brecq", reconstruction={"iters": 5})
    assert q.model_dump(mode="json")["reconstruction"]["iters"] == 5
    assert q.model_dump(mode="json")["reconstruction"]["reg"] == 0.01     # MQBench's λ
    bad = [({"pipeline": "custom", "steps": ["weight_ranges", "brecq", "activation_ranges"]},
            "brecq needs activation_ranges before it"),
           ({"pipeline": "custom", "steps": ["weight_ranges", "activation_ranges", "gptq", "qdrop"]},
            "keep one of them"),
           ({"reconstruction": {"iters": 5}}, "no step uses them"),
           ({"gptq": {"damp": 0.1}}, "steps lack gptq"),
           ({"pipeline": "qdrop", "reconstruction": {"drop_prob": 0}}, "greater than 0"),
           ({"pipeline": "qdrop", "reconstruction": {"beta_end": 30}}, "β anneals downwards"),
           ({"pipeline": "qdrop", "reconstruction": {"iterations": 30}}, "Extra inputs are not permitted")]
    for extra, msg in bad:
        with pytest.raises(ValidationError, match=msg):
            PTQParams(w_bits=4, a_bits=4, **extra)


# ------------------------------------------------------------------ bounded capture (issue #24 item 4)

def test_captured_store_reads_back_exact_values_in_memory_and_spilled():
    from qcard.quant.layerwise import Captured
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 3, 4, 4, generator=gen) for n in (5, 7, 2)]
    whole = torch.cat(parts)
    idx = torch.tensor([13, 0, 6, 6, 11, 4])
    for budget, spilled in ((1 << 30, False), (400, True)):
        st = Captured(budget)
        for p in parts:
            st.append(p)
        assert st.spilled is spilled and len(st) == 14
        assert torch.equal(st.take(idx), whole[idx])
        assert torch.equal(torch.cat(list(st.chunks(4))), whole)
        assert torch.equal(st.slice(12, 99), whole[12:])
        st.close()
    with pytest.raises(ValueError, match="does not match"):
        st = Captured(0)
        st.append(parts[0])
        st.append(parts[0][:, :2])


@pytest.mark.parametrize("unit", ["block", "layer"])
def test_spilled_capture_gives_the_same_rounding_as_in_memory(unit, monkeypatch):
    """Streaming the unit inputs and targets through a spill file is a memory change only: the same
    seed gives bit-identical weights, losses and input gaps."""
    results = []
    for mb in ("4096", "0"):
        monkeypatch.setenv("QCARD_CAPTURE_MB", mb)
        sim, batches = _sim("resnet8", 2, 4, n=96)
        rec = reconstruct(sim, batches, Settings(unit=unit, iters=12, batch_size=16, warm_start=0.25), seed=3)
        results.append(([w.detach().clone() for w in _weights(sim)],
                         [(r["loss_nearest"], r["loss_after"], r["input_gap"]) for r in rec["per_unit"]]))
    (w_mem, rows_mem), (w_disk, rows_disk) = results
    assert all(torch.equal(a, b) for a, b in zip(w_mem, w_disk))
    assert rows_mem == rows_disk
    monkeypatch.setenv("QCARD_CAPTURE_MB", "lots")
    with pytest.raises(ValueError, match="QCARD_CAPTURE_MB"):
        reconstruct(sim, batches, Settings(unit=unit, iters=1))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_float32_products_rounds_as_with_float64_products(act_order):
    """The speed change (X·Xᵀ per batch in float32, summed in float64, diagonal in float64) leaves the
    rounding as the float64 Hessian gives it, act-order included (its ties are broken at float32 precision)."""
    xtr, _, _, _ = mnist()
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(64, 10))
    torch.manual_seed(0)
    sim = build_simulated(net.eval(), SimScheme(w_bits=2, a_bits=None, w_granularity="per_channel",
                                                w_symmetric=False, weight_range="mse"), xtr[:1], log=lambda m: None)
    set_weight_ranges(sim)
    batches = list(xtr[:192].split(64))
    li = sim_info(sim).gemm_layers()[0]
    w = li.module.weight.detach().clone()
    _, s, z, _ = weight_rows(w, li.weight_quantizer)
    cols = [c for x in batches for c in [F.unfold(x, 3, padding=1).permute(1, 0, 2).reshape(9, -1).double()]]
    h = sum(c @ c.t() for c in cols) * 2 / sum(c.shape[1] for c in cols)
    ref = gptq_rows(w.reshape(16, -1), h, s, z, li.weight_quantizer.qmin, li.weight_quantizer.qmax,
                    act_order=act_order)
    gptq(sim, batches, act_order=act_order)
    got = li.module.weight.detach().reshape(16, -1)
    assert not torch.equal(got, w.reshape(16, -1))
    assert torch.equal(got, ref)


# ------------------------------------------------------------------ AdaRound's objective as a ptq param

def test_adaround_targets_is_a_ptq_param_that_stays_out_of_the_id_at_its_default():
    from pydantic import ValidationError
    from qcard.methods.base import card_sections_of
    from qcard.methods.ptq import PTQ
    from qcard.methods.ptq.params import PTQParams
    from test_quant_support import run_ptq
    steps = {"pipeline": "custom", "steps": ["weight_ranges", "adaround", "activation_ranges"], "adaround_iters": 4}
    assert "adaround_targets" not in PTQParams(w_bits=3, a_bits=8, **steps).model_dump(mode="json")
    old = PTQParams(w_bits=3, a_bits=8, adaround_targets="rounded_so_far", **steps)
    assert old.model_dump(mode="json")["adaround_targets"] == "rounded_so_far"
    with pytest.raises(ValidationError, match="fp_model"):
        PTQParams(w_bits=3, a_bits=8, adaround_targets="fp", **steps)
    gaps = {}
    for targets in ("fp_model", "rounded_so_far"):
        r = run_ptq(bundled("resnet8"), calibration_size=64, w_bits=3, a_bits=8, adaround_targets=targets, **steps)
        assert r.stats["adaround"]["targets"] == targets
        assert f"targets {targets}" in card_sections_of(PTQ(), r.stats)[0]["note"]
        gaps[targets] = [l["input_gap"] for l in r.stats["adaround"]["layers"]]
    # the old objective's "FP" input is the quantized one after the first layer; the documented one's is not
    assert all(g == 0.0 for g in gaps["rounded_so_far"][1:]) and all(g > 0.0 for g in gaps["fp_model"][1:])
    # listed as unused only where the dump holds it (published cards keep their list)
    minmax = {"pipeline": "minmax", "w_bits": 4, "a_bits": 8}
    assert "adaround_targets" not in PTQParams(**minmax).unused_params()
    assert "adaround_lr" in PTQParams(**minmax).unused_params()
    assert "adaround_targets" in PTQParams(adaround_targets="rounded_so_far", **minmax).unused_params()
