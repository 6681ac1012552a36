"""Model zoo: bundled models and their accuracy, fx tracing, torchvision/timm/python sources, weight files."""
from __future__ import annotations

import hashlib
import operator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qcard.data import load_dataset
from qcard.errors import ModelLoadError, UnknownNameError
from qcard.zoo import BUNDLED, list_models, load_model, load_model_with_info, train_model
from qcard.zoo.loader import load_state_file, state_dict_sha256
from qcard.zoo.catalog import WEIGHTS_DIR, bundled_record

TARGETS = {"resnet8": 0.97, "mobilenet_tiny": 0.97, "lenet5": 0.97, "mlp": 0.94, "vit_tiny": 0.94}


@pytest.fixture(scope="module")
def mnist_test():
    return load_dataset("qcard:mnist5k", "test").tensors()


@pytest.fixture
def user_models(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))   # makes tests/user_models.py importable


def test_every_bundled_model_has_a_target():
    assert set(TARGETS) == set(BUNDLED)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_bundled_model_loads_and_reaches_target(name, mnist_test):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, info = load_model_with_info(f"qcard:{name}")
    rec = bundled_record(name)
    path = WEIGHTS_DIR / f"{name}.safetensors"
    assert not model.training
    assert info.source == "qcard" and info.weights == f"bundled:{name}.safetensors"
    # the card's weights hash is the tensors' hash, the same for every source (rec["sha256"] is the file's)
    assert info.weights_sha256 == rec["tensors_sha256"] == state_dict_sha256(load_state_file(str(path)))
    assert rec["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.params == rec["params"] and info.input_shape == (1, 28, 28) and info.num_classes == 10
    assert path.stat().st_size < 1_000_000
    x, y = mnist_test
    with torch.no_grad():
        acc = float(torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)]).eq(y).float().mean())
    assert acc >= TARGETS[name]
    assert acc == pytest.approx(rec["test_accuracy"], abs=0.003)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_bundled_model_fx_traces(name):
    model = load_model(f"qcard:{name}", weights="random")
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-5)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    if name in ("resnet8", "mobilenet_tiny", "vit_tiny"):
        assert operator.add in targets            # residual adds are visible to fx
    if name == "vit_tiny":
        assert torch.matmul in targets


def test_list_models_rows():
    from qcard.zoo.catalog import ARCHITECTURES
    rows = {r["name"]: r for r in list_models()}
    assert set(rows) == set(BUNDLED) | set(ARCHITECTURES)
    for name, row in rows.items():
        if name in ARCHITECTURES:         # architecture only: nothing trained to report
            assert row["architecture_only"] and row["test_accuracy"] is None and row["input_shape"] == [3, 32, 32]
            continue
        assert row["params"] > 0 and row["test_accuracy"] >= TARGETS[name] and row["difficulty"]


def test_torchvision_random_weights_run_on_synthetic():
    model, info = load_model_with_info("torchvision:resnet18", num_classes=10)
    data = load_dataset("synthetic", "test", input_shape=(3, 32, 32), num_classes=10, size=4)
    x, _ = data.tensors()
    with torch.no_grad():
        assert model(x).shape == (4, 10)
    assert info.source == "torchvision" and info.weights is None
    assert info.weights_sha256 == state_dict_sha256(model.state_dict())   # random weights are hashed too
    assert info.num_classes == 10 and info.input_shape == (3, 224, 224)
    assert info.params == sum(p.numel() for p in model.parameters())
    assert info.data_config["crop_pct"] == pytest.approx(224 / 256) and len(info.data_config["mean"]) == 3
    # seeded construction: the same weights every time, and the caller's RNG is left alone
    state = torch.random.get_rng_state()
    again = load_model("torchvision:resnet18", num_classes=10)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    one = load_model("torchvision:resnet18", num_classes=10, in_chans=1)
    with torch.no_grad():
        assert one(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_timm_random_weights_run_on_synthetic():
    model, info = load_model_with_info("timm:resnet18", num_classes=10, in_chans=1)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert info.source == "timm" and info.weights is None and info.num_classes == 10
    assert info.input_shape == (1, 224, 224) and info.data_config["interpolation"] == "bicubic"
    assert info.to_dict()["input_shape"] == [1, 224, 224]
    tiny, tiny_info = load_model_with_info("timm:test_vit", num_classes=5)
    data = load_dataset("synthetic", "test", model_info=tiny_info, size=2)
    with torch.no_grad():
        assert tiny(data.tensors()[0]).shape == (2, 5)


def test_python_models(user_models):
    model, info = load_model_with_info("python:user_models:tiny_net", num_classes=3, hidden=8)
    assert info.source == "python" and info.num_classes == 3 and info.weights is None
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    _, cnn = load_model_with_info("python:user_models:TinyCNN")
    assert cnn.input_shape == (1, 28, 28) and cnn.num_classes == 10
    with pytest.raises(ModelLoadError, match="not a torch.nn.Module"):
        load_model("python:user_models:not_a_model")
    with pytest.raises(ModelLoadError, match="no attribute"):
        load_model("python:user_models:missing")
    with pytest.raises(ModelLoadError, match="cannot import"):
        load_model("python:no_such_pkg_xyz.models:net")
    with pytest.raises(ModelLoadError, match="unexpected keyword"):
        load_model("python:user_models:tiny_net", depth=3)


def test_weights_from_local_files(tmp_path):
    src = load_model("qcard:lenet5", weights="random", init_seed=7)
    state = src.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "ddp.pt")
    x = torch.randn(2, 1, 28, 28)
    for fname in ("w.safetensors", "w.pth", "ddp.pt"):
        model, info = load_model_with_info("qcard:lenet5", weights=str(tmp_path / fname))
        assert torch.allclose(model(x), src(x))
        assert info.weights == str(tmp_path / fname)
        # one hash for the same tensors, whatever the file format or key prefix
        assert info.weights_sha256 == state_dict_sha256(state)
    random_info = load_model_with_info("qcard:lenet5", weights="random", init_seed=7)[1]
    assert random_info.weights is None and random_info.weights_sha256 == state_dict_sha256(state)


def test_safetensors_weights_load_into_modules_that_check_state_versions(tmp_path):
    """safetensors keeps no per-module state-dict versions; torchvision's MNASNet refuses a state without one
    ("version should be set to 1 or 2") and BatchNorm would read it as a pre-1.0 state. The loader reads a
    file whose keys and shapes fit as the model's current format."""
    torch.manual_seed(0)
    src = load_model("torchvision:mnasnet0_5", num_classes=10)
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.num_batches_tracked.fill_(7)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "m.safetensors"))
    model, info = load_model_with_info("torchvision:mnasnet0_5", weights=str(tmp_path / "m.safetensors"),
                                       num_classes=10)
    for (k, a), (_, b) in zip(src.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    assert info.weights_sha256 == state_dict_sha256(src.state_dict())


def test_weight_file_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="nope.safetensors"):
        load_model("qcard:lenet5", weights=str(tmp_path / "nope.safetensors"))
    other = load_model("qcard:resnet8", weights="random").state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / "resnet8.safetensors"))
    with pytest.raises(ModelLoadError, match=r"missing key.*conv1\.bias.*unexpected key.*bn1\.weight"):
        load_model("qcard:lenet5", weights=str(tmp_path / "resnet8.safetensors"))
    bad = dict(load_model("qcard:lenet5").state_dict())
    bad["fc3.weight"] = torch.zeros(5, 84)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ModelLoadError, match=r"shape mismatch.*fc3\.weight: file \(5, 84\) vs model \(10, 84\)"):
        load_model("qcard:lenet5", weights=str(tmp_path / "bad.pth"))

    import argparse
    torch.save({"state_dict": argparse.Namespace(a=1)}, tmp_path / "evil.pth")   # not a tensor: refused
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_model("qcard:lenet5", weights=str(tmp_path / "evil.pth"))
    with pytest.raises(ModelLoadError, match="num_classes"):
        load_model("qcard:resnet8", num_classes=3)
    assert load_model("qcard:resnet8", num_classes=3, weights="random")(torch.randn(1, 1, 28, 28)).shape == (1, 3)


def test_unknown_names_suggest_the_right_one():
    with pytest.raises(UnknownNameError, match="did you mean 'resnet8'"):
        load_model("qcard:resnet9")
    with pytest.raises(UnknownNameError, match="did you mean 'torchvision:resnet18'"):
        load_model("torchvision:resnet19")
    with pytest.raises(UnknownNameError, match="did you mean 'timm:"):
        load_model("timm:resnet1888")
    with pytest.raises(UnknownNameError, match="did you mean 'torchvision:resnet18'"):
        load_model("resnet18")                                  # bare name: says which prefix to add
    with pytest.raises(UnknownNameError, match="did you mean 'qcard:vit_tiny'"):
        load_model("vit_tiny")
    with pytest.raises(UnknownNameError, match="did you mean 'torchvision:resnet18'"):
        load_model("torchvison:resnet18")
    with pytest.raises(UnknownNameError, match="python:user_models:tiny_net"):
        load_model("user_models:tiny_net")


def test_train_model_is_deterministic(tmp_path):
    a = train_model("mlp", epochs=1, out_dir=str(tmp_path / "a"), progress=False)
    b = train_model("mlp", epochs=1, out_dir=str(tmp_path / "b"), progress=False)
    assert a["sha256"] == b["sha256"] and a["epochs"] == 1 and a["determinism"]["threads"] == 2
    sa, sb = load_file(str(tmp_path / "a" / "mlp.safetensors")), load_file(str(tmp_path / "b" / "mlp.safetensors"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (tmp_path / "a" / "mlp.json").is_file() and a["reproduces_bundled"] is False


def test_train_model_runs_the_shared_training_loop(monkeypatch):
    """One training loop in qcard: the zoo recipe goes through qcard.training.train with its own batches."""
    import qcard.training
    calls = []
    real = qcard.training.train

    def spy(model, data, recipe, ctx, **kw):
        log = real(model, data, recipe, ctx, **kw)
        calls.append((recipe, kw, log))
        return log
    monkeypatch.setattr(qcard.training, "train", spy)
    rec = train_model("mlp", epochs=1, progress=False)
    (recipe, kw, log), = calls
    assert recipe.optimizer == "adamw" and recipe.label_smoothing == 0.05 and kw["lr_factor"] is not None
    assert len(kw["batches"]) == log.steps == 63          # 4,000 training images in batches of 64
    assert rec["final_train_loss"] == round(log.curve[-1]["loss"], 4)


@pytest.mark.slow
@pytest.mark.ci_skip_ok(reason="a CI machine's CPU need not be the one the weights were trained on")
def test_train_model_reproduces_bundled_weights():
    from qcard.provenance import cpu_name
    rec = bundled_record("lenet5")
    if rec["determinism"]["cpu"] != cpu_name() or rec["determinism"]["torch"] != torch.__version__:
        pytest.skip("bit-exact reproduction is promised on the recorded CPU model and torch version only")
    result = train_model("lenet5", progress=False)
    assert result["reproduces_bundled"] is True and result["sha256"] == rec["sha256"]


def test_zoo_train_without_out_writes_nothing(tmp_path, monkeypatch):
    """`qcard zoo train NAME` without --out prints the record and never overwrites the bundled weights."""
    from click.testing import CliRunner
    from qcard.cli import main
    before = {p.name: p.stat().st_mtime_ns for p in WEIGHTS_DIR.iterdir()}
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["zoo", "train", "mlp", "--epochs", "1"])
    assert r.exit_code == 0, r.output
    assert '"tensors_sha256"' in r.output
    assert {p.name: p.stat().st_mtime_ns for p in WEIGHTS_DIR.iterdir()} == before
    assert list(tmp_path.iterdir()) == []
