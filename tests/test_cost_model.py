"""The pure-Python cost model and the hardware profiles (no torch needed)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from qcard.cost import ProfileError, apply_bits, estimate, list_profiles, load_profile
from qcard.errors import QcardError, UnknownNameError
from qcard.records import LayerRecord

CARD_KEYS = {"profile", "params", "size_bits", "size_bits_with_metadata", "macs", "bops", "bops_uniq",
             "activation_peak_bits", "memory_traffic_bits", "energy_pj", "latency_cycles",
             "speedup_vs_fp32", "speedup_vs_int8", "layers"}
LAYER_KEYS = {"name", "op", "macs", "params", "weight_bits", "activation_bits", "bops", "cycles", "energy_pj",
              "effective_activation_bits"}
SHIPPED = {"bitops", "asic45", "eyeriss-relative", "systolic-ws", "gpu-t4", "riscv-mpic"}


def conv(name="conv", cin=64, cout=64, k=3, hw=56, stride=1, groups=1, **kw) -> LayerRecord:
    ho = hw // stride
    weight = (cout, cin // groups, k, k)
    return LayerRecord(name=name, op="conv2d", input_shape=(1, cin, hw, hw), output_shape=(1, cout, ho, ho),
                       weight_shape=weight, kernel_size=(k, k), stride=(stride, stride), padding=(k // 2, k // 2),
                       groups=groups, params=math.prod(weight), macs=ho * ho * cout * (cin // groups) * k * k, **kw)


def linear(name="fc", cin=512, cout=1000, bias=True, **kw) -> LayerRecord:
    return LayerRecord(name=name, op="linear", input_shape=(1, cin), output_shape=(1, cout),
                       weight_shape=(cout, cin), params=cout * cin + (cout if bias else 0), macs=cin * cout, **kw)


def add(name="add", c=64, hw=56) -> LayerRecord:
    s = (1, c, hw, hw)
    return LayerRecord(name=name, op="add", input_shape=s, output_shape=s, extra={"input_shapes": [s, s]})


def net():
    return [conv("conv1", 3, 64, 7, 224, 2), conv("layer1.0.conv1"), add("layer1.0.add"), linear("fc", 64, 10)]


# -- the conv formula and the card's keys -------------------------------------------------------

def test_resnet18_3x3_layer_macs_formula():
    # H_o·W_o·C_out·(C_in/g)·k² for the 3×3 64→64 conv at 56×56 (specs/cost.md)
    assert conv().macs == 115_605_504


@pytest.mark.parametrize("profile", sorted(SHIPPED))
def test_estimate_returns_card_keys_and_is_json(profile):
    out = estimate(apply_bits(net(), 8, 8), profile, total_params=200_000)
    assert CARD_KEYS <= set(out)
    assert out["profile"] == profile
    for layer in out["layers"]:
        assert LAYER_KEYS <= set(layer)
    assert [r["name"] for r in out["layers"]] == [r.name for r in net()]
    json.dumps(out, allow_nan=False)    # plain JSON, no NaN


@pytest.mark.parametrize("bits,factor", [(8, 64), (4, 16), (2, 4), (16, 256)])
def test_bops_are_macs_times_bw_ba(bits, factor):
    out = estimate(apply_bits(net(), bits, bits), "bitops")
    assert out["bops"] == factor * out["macs"]
    for layer in out["layers"]:
        assert layer["bops"] == factor * layer["macs"]


def test_mixed_bits_bops_and_fp32_default():
    recs = [conv(weight_bits=4, activation_bits=8), linear()]          # fc left FP32 (None)
    out = estimate(recs, "bitops")
    assert out["layers"][0]["bops"] == 32 * recs[0].macs
    assert out["layers"][1]["bops"] == 32 * 32 * recs[1].macs
    assert out["layers"][1]["weight_bits"] == 32 and out["layers"][1]["activation_bits"] == 32


def test_uniq_bops_adds_accumulation_term():
    rec = conv(weight_bits=4, activation_bits=4)
    out = estimate([rec], "bitops")
    fan_in = 64 * 9
    assert out["bops_uniq"] == pytest.approx(rec.macs * (16 + 4 + 4 + math.log2(fan_in)))


@pytest.mark.parametrize("bits,fp32,int8", [(16, 2.0, 0.5), (8, 4.0, 1.0), (4, 8.0, 2.0), (None, 1.0, 0.25)])
def test_bit_weighted_speedup(bits, fp32, int8):
    out = estimate(apply_bits(net(), bits, bits), "bitops")
    assert out["speedup_vs_fp32"] == fp32          # exactly: 16-bit gives 2.0, 8-bit 4.0
    assert out["speedup_vs_int8"] == int8
    assert out["speedup_baselines"]["fp32"]["profile"] == "bitops"
    assert "FP32" in out["speedup_baselines"]["fp32"]["baseline"]


def test_bit_weighted_speedup_counts_skipped_zero_weights():
    recs = [dataclass_replace(r, weight_sparsity=0.5) for r in apply_bits(net(), 16, 16)]
    assert estimate(recs, "bitops")["speedup_vs_fp32"] == 2.0
    out = estimate(recs, "bitops", weight_sparsity_aware=True)
    assert out["speedup_vs_fp32"] == 4.0
    assert out["effective_macs"] == out["macs"] / 2 and out["weight_sparsity_aware"] is True


def dataclass_replace(rec, **kw):
    import dataclasses
    return dataclasses.replace(rec, **kw)


# -- size, metadata, activations, traffic -----------------------------------------------------------

def test_size_with_bias_outside_params_and_metadata():
    recs = [conv(weight_bits=4, activation_bits=8, weight_granularity="per_channel"),
            linear(weight_bits=8, activation_bits=8)]
    out = estimate(recs, "bitops", total_params=recs[0].params + recs[1].params + 128)
    expected = recs[0].params * 4 + 512 * 1000 * 8 + 1000 * 32 + 128 * 32
    assert out["size_bits"] == expected
    # per-channel weights: 64 (scale, zero-point) pairs; per-tensor: 1; each activation input: 1
    assert out["size_bits_with_metadata"] - out["size_bits"] == (64 + 1 + 1 + 1) * 64
    assert out["params"] == recs[0].params + recs[1].params + 128
    fp = estimate([conv(), linear()], "bitops")
    assert fp["size_bits_with_metadata"] == fp["size_bits"] == 32 * (conv().params + linear().params)


def test_activation_memory_and_traffic():
    c = conv(weight_bits=8, activation_bits=8)
    a = dataclass_replace(add(), activation_bits=8)
    out = estimate([c, a], "bitops")
    fmap = 64 * 56 * 56 * 8
    assert out["largest_activation_map_bits"] == fmap
    assert out["activation_peak_bits"] == 3 * fmap            # the add: two inputs + its output
    assert out["activation_total_bits"] == 2 * fmap
    assert out["memory_traffic_bits"] == c.params * 8 + 2 * fmap + 3 * fmap
    assert out["compulsory_traffic_bits"] == out["memory_traffic_bits"]


# -- dynamic precision ---------------------------------------------------------------------------------

def test_expected_cost_from_bit_distributions():
    rec = conv(weight_bits=8, activation_bits=8, activation_bits_distribution={4: 0.5, 8: 0.5},
               weight_bits_distribution={4: 1, 8: 3})
    out = estimate([rec, linear(weight_bits=8, activation_bits=8)], "bitops")
    layer = out["layers"][0]
    assert layer["effective_activation_bits"] == 6 and layer["activation_bits"] == 8
    assert layer["effective_weight_bits"] == 7
    assert layer["bops"] == rec.macs * 7 * 6
    assert layer["expected_cost"] is True and out["layers"][1]["expected_cost"] is False
    assert out["expected_cost"] is True
    assert any("expected" in n for n in out["notes"])
    assert estimate([linear(weight_bits=8, activation_bits=8)], "bitops")["expected_cost"] is False


# -- energy ----------------------------------------------------------------------------------------

def _mac_only(w, a, macs=1000):
    # no shapes: no memory traffic, so energy is MACs·E_mac
    return LayerRecord(name="m", op="matmul", macs=macs, weight_bits=w, activation_bits=a)


def test_asic45_scaling_reproduces_horowitz_32bit_entries():
    mac = load_profile("asic45").energy.mac
    e_mult = lambda bw, ba: mac.mult * bw * ba / mac.anchor_bits ** 2
    e_add = lambda b: mac.add * b / mac.anchor_bits
    assert e_mult(8, 8) == pytest.approx(0.2) and e_add(8) == pytest.approx(0.03)
    # Horowitz 45 nm: int32 mult 3.1 pJ, int32 add 0.1 pJ; the spec allows about 20 %
    assert e_mult(32, 32) == pytest.approx(3.2)
    assert abs(e_mult(32, 32) / 3.1 - 1) <= 0.2
    assert e_add(32) == pytest.approx(0.12)
    assert abs(e_add(32) / 0.1 - 1) <= 0.2 + 1e-9
    # through the model: INT8 MAC with a 32-bit accumulator ≈ 0.3 pJ, FP32 MAC = 3.7 + 0.9 pJ
    assert estimate([_mac_only(8, 8)], "asic45")["energy_pj"] == pytest.approx(1000 * 0.32)
    assert estimate([_mac_only(None, None)], "asic45")["energy_pj"] == pytest.approx(1000 * 4.6)
    assert estimate([_mac_only(32, 32)], "asic45")["energy_pj"] == pytest.approx(1000 * 3.32)


def test_asic45_memory_energy_and_ratios():
    out = estimate(apply_bits(net(), 8, 8), "asic45")
    dram_sram = out["memory_traffic_bits"] * (1300 + 100) / 64
    mac = out["macs"] * 0.32
    assert out["energy_pj"] == pytest.approx(dram_sram + mac)
    assert out["energy_ratio_vs_int8"] == pytest.approx(1.0)
    assert out["energy_ratio_vs_fp32"] > 4
    assert out["latency_cycles"] is None and out["speedup_vs_fp32"] is None


def test_eyeriss_relative_energy_is_not_pj():
    out = estimate([_mac_only(16, 16)], "eyeriss-relative")
    assert out["energy_pj"] is None and out["energy_unit"] == "MAC16"
    # one 16-bit MAC = 1, plus register-file reads of both operands and a 16-bit partial sum read+write
    assert out["energy"] == pytest.approx(1000 * (1 + (16 + 16 + 2 * 16) / 16))
    assert out["layers"][0]["energy_pj"] is None
    assert any("MAC16" in n for n in out["notes"])


# -- latency profiles -------------------------------------------------------------------------------

def test_systolic_pe_modes():
    recs = [conv()]
    cyc = lambda bits, prof: estimate(apply_bits(recs, bits, bits), prof)["latency_cycles"]
    base = cyc(8, "systolic-ws")
    assert base == math.ceil(576 / 32) * math.ceil(64 / 32) * (2 * 32 + 32 + 56 * 56 - 2)
    assert cyc(4, "systolic-ws") == base                   # fixed 8-bit PE: no gain below 8 bits
    assert cyc(16, "systolic-ws") == 4 * base              # 16-bit operands: 2×2 slices
    assert cyc(None, "systolic-ws") == 16 * base           # FP32 as 32-bit slices
    assert cyc(4, "systolic-ws:pe_mode=bit_scalable") == math.ceil(base / 4)
    assert cyc(2, "systolic-ws:pe_mode=bit_scalable") == math.ceil(base / 16)
    assert cyc(3, "systolic-ws:pe_mode=bit_scalable") == math.ceil(base / 4)     # 3 bits run as 4
    assert cyc(8, "systolic-ws:pe_mode=sparq") == math.ceil(base / 2)
    out = estimate(apply_bits(recs, 8, 8), "systolic-ws:pe_mode=sparq")
    assert out["speedup_vs_int8"] == pytest.approx(2.0, rel=1e-6)    # baseline is the fixed 8-bit PE
    assert out["speedup_vs_fp32"] == pytest.approx(32.0, rel=1e-6)
    assert out["profile"] == "systolic-ws:pe_mode=sparq"
    assert "(fixed 8-bit PE)" in out["speedup_baselines"]["int8"]["baseline"]


def test_systolic_sparq_keeps_8bit_activations_in_memory():
    rec = conv(weight_bits=8, activation_bits=8, activation_bits_distribution={4: 1.0})
    sparq = estimate([rec], "systolic-ws:pe_mode=sparq")
    bitops = estimate([rec], "bitops")
    assert sparq["layers"][0]["activation_in_bits"] == 64 * 56 * 56 * 8
    assert bitops["layers"][0]["activation_in_bits"] == 64 * 56 * 56 * 4


def test_systolic_grouped_conv_runs_one_gemm_per_group():
    dw = conv("dw", 32, 32, 3, 16, groups=32)
    cycles = estimate(apply_bits([dw], 8, 8), "systolic-ws")["latency_cycles"]
    assert cycles == 32 * 1 * 1 * (2 * 32 + 32 + 16 * 16 - 2)


def test_systolic_options_resize_array():
    recs = apply_bits([conv()], 8, 8)
    out = estimate(recs, "systolic-ws:rows=64,cols=64")
    assert out["latency_cycles"] == math.ceil(576 / 64) * 1 * (2 * 64 + 64 + 3136 - 2)
    assert load_profile("systolic-ws:latency.sram_kb.ifmap=512").latency.sram_kb.ifmap == 512


def test_gpu_t4_roofline_and_caution():
    recs = [conv("big", 256, 256, 3, 56)]        # compute bound at every width
    t = lambda bits: estimate(apply_bits(recs, bits, bits), "gpu-t4")
    int8, int4, fp32 = t(8), t(4), t(None)
    assert int8["layers"][0]["bound"] == "compute"
    assert int8["latency_s"] == pytest.approx(recs[0].macs / (130e12 / 2))
    assert int4["speedup_vs_int8"] == pytest.approx(2.0)
    assert fp32["latency_s"] == pytest.approx(recs[0].macs / (8.1e12 / 2))
    assert int8["latency_cycles"] == pytest.approx(int8["latency_s"] * 1.59e9)
    assert any("1.70x" in n and "HAWQ-V3" in n for n in int8["notes"])
    add_only = estimate([add()], "gpu-t4")
    assert add_only["layers"][0]["bound"] == "memory"


def test_riscv_mpic_lookup():
    rec = conv()
    for (w, a), rate in {(4, 4): 3.5, (2, 8): 2.5, (8, 2): 2.2, (8, 8): 2.1}.items():
        out = estimate([dataclass_replace(rec, weight_bits=w, activation_bits=a)], "riscv-mpic")
        assert out["latency_cycles"] == pytest.approx(rec.macs / rate)
    out = estimate(apply_bits([rec], 4, 4), "riscv-mpic")
    assert out["speedup_vs_int8"] == pytest.approx(3.5 / 2.1)


def test_non_mac_layers_cost_no_bops():
    out = estimate(apply_bits([add()], 8, 8), "systolic-ws")
    assert out["macs"] == 0 and out["bops"] == 0 and out["latency_cycles"] == 0
    assert out["layers"][0]["weight_bits"] is None


# -- apply_bits -------------------------------------------------------------------------------------

def test_apply_bits_first_last():
    recs = apply_bits(net(), 4, 4, first_last=(None, None))
    assert [(r.weight_bits, r.activation_bits) for r in recs] == [(None, None), (4, 4), (None, 4), (None, None)]
    recs = apply_bits(net(), 4, 4, first_last=8)
    assert recs[0].weight_bits == 8 and recs[-1].activation_bits == 8 and recs[1].weight_bits == 4
    assert net()[0].weight_bits is None                  # inputs are not modified


# -- profiles -------------------------------------------------------------------------------------

def test_shipped_profiles_load_and_cite_sources():
    assert SHIPPED <= set(list_profiles())
    for name in list_profiles():
        prof = load_profile(name)
        assert prof.name == name and prof.sources and prof.path.endswith(f"{name}.yaml")


def test_unknown_profile_suggests_name():
    with pytest.raises(UnknownNameError, match="did you mean 'asic45'"):
        load_profile("asic46")


def _write(tmp_path, text, name="chip.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD = """
name: mychip
description: test chip
sources: {me: "my own measurements, 2024"}
latency:
  model: lookup
  macs_per_cycle: {8: {8: 4.0}}
  source: me
speedup: {definition: latency, source: me}
"""


def test_user_profile_by_path(tmp_path):
    path = _write(tmp_path, GOOD)
    out = estimate(apply_bits([conv()], 8, 8), str(path))
    assert out["profile"] == "mychip"
    assert out["latency_cycles"] == pytest.approx(conv().macs / 4.0)


@pytest.mark.parametrize("text,where", [
    (GOOD.replace("speedup:", "speeed_up:"), "speeed_up: unknown key"),
    (GOOD.replace("macs_per_cycle", "macs_per_cycel"), "latency.lookup.macs_per_cycel"),
    (GOOD.replace("source: me\nspeedup", "source: nobody\nspeedup"), "latency.source 'nobody' is not a key of sources"),
    (GOOD.replace("{8: {8: 4.0}}", "{8: {8: four}}"), "latency.lookup.macs_per_cycle.8.8"),
    (GOOD.replace("model: lookup", "model: abacus"), "latency"),
    ("- just\n- a list\n", "must hold a mapping"),
    ("name: [unclosed\n", "not valid YAML"),
])
def test_malformed_profile_names_file_and_key(tmp_path, text, where):
    path = _write(tmp_path, text)
    with pytest.raises(ProfileError) as exc:
        load_profile(str(path))
    msg = str(exc.value)
    assert str(path) in msg and where in msg
    assert isinstance(exc.value, QcardError)


def test_profile_file_missing_and_bad_options(tmp_path):
    with pytest.raises(ProfileError, match="not found"):
        load_profile(str(tmp_path / "nope.yaml"))
    with pytest.raises(ProfileError, match="'pe_mod'"):
        load_profile("systolic-ws:pe_mod=sparq")
    with pytest.raises(ProfileError, match="pe_mode"):
        load_profile("systolic-ws:pe_mode=turbo")


def test_cost_model_does_not_import_torch():
    code = ("import sys; from qcard.cost import estimate, apply_bits, load_profile; "
            "import qcard.cost.model, qcard.commands.cost; "
            "from qcard.records import LayerRecord; "
            "estimate([LayerRecord(name='l', op='linear', macs=10, weight_shape=(2, 5), params=10)], 'asic45'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sparq_pe_mode_skips_layers_the_method_kept_at_8_bits():
    from qcard.cost import estimate, load_profile
    from qcard.records import LayerRecord

    def conv(flag):
        return LayerRecord(name="c", op="conv2d", input_shape=(1, 64, 8, 8), output_shape=(1, 64, 8, 8),
                           weight_shape=(64, 64, 3, 3), kernel_size=(3, 3), stride=(1, 1), padding=(1, 1),
                           params=64 * 64 * 9, macs=64 * 64 * 9 * 64, weight_bits=8, activation_bits=8,
                           extra={"sparq": flag})
    prof = load_profile("systolic-ws:pe_mode=sparq")
    on = estimate([conv(True)], prof)["latency_cycles"]
    off = estimate([conv(False)], prof)["latency_cycles"]
    assert off > on * 1.5
