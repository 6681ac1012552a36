"""The ptq method's Params: every tradeoff a switch, defaults expanded, conflicts rejected before running."""
import pytest
from pydantic import ValidationError

from qcard.methods.ptq import PIPELINES, PTQ, PTQParams
from qcard.quant.presets import PRESET_NAMES, list_presets, load_preset


def test_defaults_are_expanded_and_round_trip():
    p = PTQParams()
    assert p.pipeline == "standard" and p.steps == PIPELINES["standard"]
    assert (p.weight_range, p.activation_range, p.logits_range) == ("mse", "mse", "cross_entropy")
    assert p.adaround_iters == 10000
    dumped = p.model_dump()
    assert PTQParams.model_validate(dumped) == p          # resolved params validate again unchanged
    m = PTQParams(pipeline="minmax")
    assert m.steps == ["weight_ranges", "activation_ranges"] and m.weight_range == "minmax"
    assert PTQParams(w_bits=4).adaround_iters == 15000   # AIMET: 15k iterations below 8 bits
    assert PTQ.name == "ptq" and PTQ.family == "ptq" and PTQ.Params is PTQParams


def test_plain_field_types_only():
    """Only genuinely list-valued fields are lists (the config layer reads a YAML list as a sweep)."""
    lists = {name for name, f in PTQParams.model_fields.items() if "List" in str(f.annotation) or "list" in str(f.annotation)}
    assert lists == {"steps", "overrides", "mp_allowed_bits"}


def test_unknown_keys_and_bad_values():
    with pytest.raises(ValidationError, match="extra"):
        PTQParams(wbits=4)
    with pytest.raises(ValidationError):
        PTQParams(w_bits=1)
    with pytest.raises(ValidationError):
        PTQParams(residual_add="everything")


def test_weight_only():
    p = PTQParams(weight_only=True)
    assert p.a_bits is None and p.input_bits is None and "activation_ranges" not in p.steps
    assert PTQParams(a_bits=None).input_bits is None
    assert PTQParams(a_bits=None, input_bits=8).input_bits == 8
    with pytest.raises(ValidationError, match="weight_only: true contradicts a_bits"):
        PTQParams(weight_only=True, a_bits=8)


def test_custom_steps_are_checked():
    p = PTQParams(pipeline="custom", steps=["cle", "weight_ranges", "adaround", "activation_ranges"])
    assert p.steps[2] == "adaround"
    with pytest.raises(ValidationError, match="pipeline: custom needs steps"):
        PTQParams(pipeline="custom")
    with pytest.raises(ValidationError, match="use pipeline: custom"):
        PTQParams(pipeline="minmax", steps=["weight_ranges"])
    with pytest.raises(ValidationError, match="adaround needs weight_ranges before it"):
        PTQParams(pipeline="custom", steps=["adaround", "weight_ranges", "activation_ranges"])
    with pytest.raises(ValidationError, match="bias_absorption needs cle"):
        PTQParams(pipeline="custom", steps=["bias_absorption", "weight_ranges", "activation_ranges"])
    with pytest.raises(ValidationError, match="lack activation_ranges"):
        PTQParams(pipeline="custom", steps=["weight_ranges"])
    with pytest.raises(ValidationError, match="repeat"):
        PTQParams(pipeline="custom", steps=["weight_ranges", "weight_ranges", "activation_ranges"])
    with pytest.raises(ValidationError, match="cle needs bn: folded"):
        PTQParams(bn="kept", pipeline="custom", steps=["cle", "weight_ranges", "activation_ranges"])
    assert "cle" not in PTQParams(bn="kept").steps      # named pipelines skip CLE when BN is kept


def test_granularity_and_range_conflicts():
    with pytest.raises(ValidationError, match="needs w_group_size"):
        PTQParams(w_granularity="per_group")
    with pytest.raises(ValidationError, match="only used with w_granularity: per_group"):
        PTQParams(w_group_size=32)
    with pytest.raises(ValidationError, match="kl is per tensor only"):
        PTQParams(a_granularity="per_channel", activation_range="kl")
    assert PTQParams(a_granularity="per_channel").logits_range == "same"
    with pytest.raises(ValidationError, match="not used with dynamic_activations"):
        PTQParams(dynamic_activations=True, activation_range="kl")
    with pytest.raises(ValidationError, match="needs a budget"):
        PTQParams(mixed_precision=True)


def test_overrides():
    p = PTQParams(overrides=[{"pattern": "layer1.*", "w_bits": 4}, {"pattern": "fc", "fp32": True}])
    assert p.overrides[1].fp32 and p.overrides[0].a_bits is None
    with pytest.raises(ValidationError, match="changes nothing"):
        PTQParams(overrides=[{"pattern": "fc"}])
    with pytest.raises(ValidationError, match="drop w_bits"):
        PTQParams(overrides=[{"pattern": "fc", "fp32": True, "w_bits": 4}])


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_are_data_with_sources(name):
    p = load_preset(name)
    assert p["name"] == name and p["hardware"]
    for entry in list(p["settings"].values()) + list((p.get("allowed") or {}).values()):
        assert entry["source"] in p["sources"] and p["sources"][entry["source"]]
    params = PTQParams(preset=name)
    for key, entry in p["settings"].items():
        assert getattr(params, key) == entry["value"]          # the preset's scheme is applied


def test_presets_match_the_mqbench_table():
    rows = {r["name"]: r["settings"] for r in list_presets()}
    table = {  # MQBench (Li et al. 2021) Table 1: scale, weights, activations, BN fold
        "academic": ("float", "per_tensor", True, True, "kept"),
        "tensorrt": ("float", "per_channel", True, True, "folded"),
        "acl": ("float", "per_channel", False, False, "folded"),
        "tvm": ("power_of_two", "per_tensor", True, True, "folded"),
        "snpe": ("float", "per_tensor", False, False, "folded"),
        "fbgemm": ("float", "per_channel", False, False, "folded"),
    }
    for name, (scale, wg, wsym, asym, bn) in table.items():
        r = rows[name]
        assert (r["scale_format"], r["w_granularity"], r["w_symmetric"], r["a_symmetric"], r["bn"]) == \
            (scale, wg, wsym, asym, bn), name
        assert r["a_granularity"] == "per_tensor"


def test_preset_conflicts_rejected_before_running():
    with pytest.raises(ValidationError, match=r"preset 'tensorrt'.*w_symmetric=False \(asymmetric weights\)"):
        PTQParams(preset="tensorrt", w_symmetric=False)
    for name in PRESET_NAMES:
        with pytest.raises(ValidationError, match="per-channel activations"):
            PTQParams(preset=name, a_granularity="per_channel")
    with pytest.raises(ValidationError, match="runs only \\[8\\]"):
        PTQParams(preset="snpe", w_bits=4)
    with pytest.raises(ValidationError, match="runs only \\[8\\]"):
        PTQParams(preset="fbgemm", overrides=[{"pattern": "fc", "w_bits": 4}])
    # a setting equal to the preset's is fine; academic keeps BN, so the standard pipeline drops CLE
    assert PTQParams(preset="tensorrt", w_symmetric=True).w_symmetric
    acad = PTQParams(preset="academic", w_bits=4)
    assert acad.bn == "kept" and "cle" not in acad.steps
    with pytest.raises(ValidationError, match="cle"):
        PTQParams(preset="academic", pipeline="custom", steps=["cle", "weight_ranges", "activation_ranges"])


def test_presets_and_params_import_without_torch(subprocess_env):
    import subprocess
    import sys
    code = ("import sys; from qcard.quant.presets import list_presets; import qcard.methods.ptq as p; "
            "p.PTQParams(preset='snpe'); rows = list_presets(); "
            "assert len(rows) == 6 and all(r['hardware'] for r in rows); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
