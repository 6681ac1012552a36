"""Accuracy on the bundled models (qcard:mnist5k: 1,000 test images, 256 calibration images from train)."""
import copy
import warnings

import pytest
import torch

from test_quant_support import accuracy, bundled, mnist, one_thread, point_data, run_ptq

MODELS = ["resnet8", "mobilenet_tiny", "lenet5", "mlp", "vit_tiny"]


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


def _test_acc(model):
    _, _, xt, yt = mnist()
    return accuracy(model, xt, yt)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("pipeline", ["minmax", "standard"])
def test_w8a8_per_channel_close_to_fp32(name, pipeline):
    model = bundled(name)
    fp32 = _test_acc(model)
    r = run_ptq(model, pipeline=pipeline, w_bits=8, a_bits=8, w_granularity="per_channel")
    q = _test_acc(r.model)
    assert abs(fp32 - q) <= 0.5, f"{name} {pipeline}: FP32 {fp32:.2f} vs W8A8 {q:.2f}"


def test_depthwise_per_tensor_loss_and_cle_recovery():
    """MobileNet-style depthwise convs: after BN folding their per-channel ranges differ widely, so
    per-tensor weights lose far more than per-channel at low bits, and CLE + high-bias absorption
    recovers most of the difference (white paper, Table 5)."""
    model = bundled("mobilenet_tiny")
    common = dict(w_bits=3, a_bits=None, weight_range="minmax", calibration_size=64)
    per_tensor = _test_acc(run_ptq(model, pipeline="custom", steps=["weight_ranges"], w_granularity="per_tensor",
                                   **common).model)
    per_channel = _test_acc(run_ptq(model, pipeline="custom", steps=["weight_ranges"], w_granularity="per_channel",
                                    **common).model)
    cle = _test_acc(run_ptq(model, pipeline="custom", steps=["cle", "bias_absorption", "weight_ranges"],
                            w_granularity="per_tensor", **common).model)
    gap = per_channel - per_tensor
    assert gap >= 5.0, (per_tensor, per_channel)
    assert cle - per_tensor >= 0.5 * gap, (per_tensor, cle, per_channel)


@pytest.mark.slow
def test_adaround_beats_nearest_at_3_bits():
    model = bundled("resnet8")
    common = dict(w_bits=3, w_granularity="per_tensor", weight_range="minmax", activation_range="minmax",
                  logits_range="same")
    nearest = _test_acc(run_ptq(model, pipeline="custom", steps=["weight_ranges", "activation_ranges"], **common).model)
    r = run_ptq(model, pipeline="custom", steps=["weight_ranges", "adaround", "activation_ranges"],
                adaround_iters=300, **common)
    ada = _test_acc(r.model)
    assert r.quantization["weights"]["rounding"] == "adaround"
    assert all(l["output_mse_adaround"] < l["output_mse_nearest"] for l in r.stats["adaround"]["layers"])
    assert ada > nearest + 2.0, (nearest, ada)


def _torch_ao_fake_quant(model, batches):
    """torch.ao's FX fake-quant model of the same scheme: per-channel symmetric int8 weights, per-tensor
    affine uint8 activations, min-max observers, conv-bn folded; calibrated, evaluated without convert.
    (prepare_qat_fx, because plain prepare_fx inserts observers that leave values in FP32.)"""
    from torch.ao.quantization import (FakeQuantize, MinMaxObserver, PerChannelMinMaxObserver, QConfig,
                                       QConfigMapping, disable_observer)
    from torch.ao.quantization.quantize_fx import prepare_qat_fx
    qc = QConfig(
        activation=FakeQuantize.with_args(observer=MinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
                                          qscheme=torch.per_tensor_affine),
        weight=FakeQuantize.with_args(observer=PerChannelMinMaxObserver, quant_min=-128, quant_max=127,
                                      dtype=torch.qint8, qscheme=torch.per_channel_symmetric))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_qat_fx(copy.deepcopy(model).train(), QConfigMapping().set_global(qc), (batches[0][:1],))
    prepared.eval()
    prepared.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
    with torch.no_grad():
        for x in batches:
            prepared(x)
    prepared.apply(disable_observer)
    return prepared


def test_peer_cross_check_with_torch_ao():
    model = bundled("resnet8")
    r = run_ptq(model, pipeline="minmax", w_granularity="per_channel", w_symmetric=True, a_symmetric=False,
                bn="folded")
    data = point_data(256)
    batches = [x for x, _ in data.loader(data.calibration_set(), batch_size=32)]
    ao = _torch_ao_fake_quant(model, batches)
    ours, theirs = _test_acc(r.model), _test_acc(ao)
    assert abs(ours - theirs) <= 0.3, (ours, theirs)
