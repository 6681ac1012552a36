"""Configs: every malformed-config kind exits 2 with the key path and no traceback; sweeps expand."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from qcard.cli import main
from qcard.config import config_json_schema, load_config
from qcard.errors import ConfigError

GOOD = """\
experiment: t
models: [qcard:lenet5]
dataset: {ref: qcard:mnist5k, eval_size: 100}
methods:
  - fp32
"""


def cli(*args):
    result = CliRunner().invoke(main, list(map(str, args)))
    return result.exit_code, result.output


def assert_config_error(path, *fragments):
    code, out = cli("validate", path)
    assert code == 2, out
    assert "Traceback" not in out
    assert str(path) in out
    for f in fragments:
        assert f in out, f"{f!r} not in {out!r}"
    return out


def test_good_config_validates(write_config):
    code, out = cli("validate", write_config(GOOD))
    assert code == 0, out
    assert "1 point" in out


def test_yaml_syntax_error(write_config):
    assert_config_error(write_config("experiment: t\nmodels: [qcard:lenet5\n"), "YAML syntax error", "line")


def test_duplicate_key(write_config):
    out = assert_config_error(write_config(GOOD + "experiment: other\n"), "duplicate key 'experiment'")
    assert "line 6" in out and "line 1" in out


def test_unknown_key_with_did_you_mean(write_config):
    text = GOOD.replace("eval_size: 100", "eval_sise: 100")
    assert_config_error(write_config(text), "dataset.eval_sise", "unknown key", "did you mean 'eval_size'")


def test_unknown_top_level_key(write_config):
    assert_config_error(write_config(GOOD + "modles: []\n"), "modles", "did you mean 'models'")


def test_wrong_type(write_config):
    text = GOOD.replace("eval_size: 100", "eval_size: many")
    assert_config_error(write_config(text), "dataset.eval_size", "'many'")


def test_bad_enum_value(write_config):
    out = assert_config_error(write_config(GOOD + "device: gpu\n"), "device", "'gpu'", "cpu", "cuda")
    assert "config.yaml:6:" in out


def test_unknown_model_name(write_config):
    text = GOOD.replace("qcard:lenet5", "qcard:lenet6")
    assert_config_error(write_config(text), "models[0].ref", "did you mean 'lenet5'")


def test_model_without_prefix_suggests_one(write_config):
    text = GOOD.replace("qcard:lenet5", "resnet18")
    assert_config_error(write_config(text), "models[0].ref", "source prefix", "torchvision:resnet18")


def test_unknown_dataset(write_config):
    text = GOOD.replace("qcard:mnist5k", "qcard:mnist")
    assert_config_error(write_config(text), "dataset.ref", "did you mean 'qcard:mnist5k'")


def test_unknown_method(write_config):
    text = GOOD.replace("  - fp32", "  - fp23")
    assert_config_error(write_config(text), "methods[0].name", "did you mean 'fp32'", "choices")


def test_user_method_that_is_not_a_method(write_config):
    text = GOOD.replace("  - fp32", "  - user_methods:NotAMethod")
    assert_config_error(write_config(text), "methods[0].name", "not a qcard method")


def test_missing_weights_file(write_config):
    text = GOOD.replace("models: [qcard:lenet5]", "models: [{ref: qcard:lenet5, weights: nope.safetensors}]")
    assert_config_error(write_config(text), "models[0].weights", "not found", "nope.safetensors")


def test_weights_random_and_bundled_are_words_not_files(write_config, tmp_path):
    text = GOOD.replace("models: [qcard:lenet5]", "models: [{ref: qcard:lenet5, weights: random}]")
    code, out = cli("validate", write_config(text))
    assert code == 0, out
    exp = load_config(write_config(text))
    assert exp.config.models[0].weights == "random"          # not turned into a path next to the config
    text = GOOD.replace("models: [qcard:lenet5]", "models: [{ref: torchvision:resnet18, weights: bundled}]")
    assert_config_error(write_config(text), "models[0].weights", "qcard: models only")


def test_missing_cifar_files_fail_at_validate_time(write_config, tmp_path):
    text = GOOD.replace("dataset: {ref: qcard:mnist5k, eval_size: 100}",
                        f"dataset: {{ref: torchvision:CIFAR10, root: {tmp_path / 'cifar'}}}")
    assert_config_error(write_config(text), "dataset.root", "cifar-10-batches-py", "download: true")
    (tmp_path / "cifar" / "cifar-10-batches-py").mkdir(parents=True)
    code, out = cli("validate", "--no-build", write_config(text, "ok.yaml"))   # the folder is there (empty)
    assert code == 0, out
    # asking for a download: nothing to check yet (validate builds the models but downloads nothing)
    text = text.replace("root:", "download: true, root:").replace("cifar}", "elsewhere}")
    code, out = cli("validate", write_config(text, "dl.yaml"))
    assert code == 0, out
    assert not (tmp_path / "elsewhere").exists()


def test_unknown_method_param(write_config):
    text = GOOD.replace("  - fp32", "  - {name: user_methods:ScaleWeights, params: {facter: 2}}")
    assert_config_error(write_config(text), "methods[0].params.facter", "did you mean 'factor'")


def test_wrong_method_param_type(write_config):
    text = GOOD.replace("  - fp32", "  - {name: user_methods:ScaleWeights, params: {factor: big}}")
    assert_config_error(write_config(text), "methods[0].params.factor", "'big'")


def test_unknown_cost_profile(write_config):
    assert_config_error(write_config(GOOD + "cost: {profiles: [bitop]}\n"), "cost.profiles[0]", "did you mean 'bitops'")


def test_empty_and_non_mapping_configs(write_config):
    assert_config_error(write_config(""), "empty")
    assert_config_error(write_config("- a\n- b\n"), "top level must be a mapping")


def test_missing_config_file(tmp_path):
    code, out = cli("validate", tmp_path / "nope.yaml")
    assert code == 2 and "not found" in out and "Traceback" not in out


def test_run_with_bad_config_exits_2(write_config):
    code, out = cli("run", write_config(GOOD + "experiment: x\n"))
    assert code == 2 and "duplicate key" in out


def test_yaml_tags_cannot_execute_code(write_config):
    text = GOOD.replace("experiment: t", "experiment: !!python/object/apply:os.system ['echo hi']")
    assert_config_error(write_config(text), "YAML syntax error")


SWEEP = """\
experiment: sweep
models: [qcard:lenet5, qcard:mlp]
dataset: {ref: qcard:mnist5k, eval_size: 100, calibration: {size: [64, 128]}}
methods:
  - fp32
  - name: user_methods:ScaleWeights
    params: {factor: [1.0, 0.5, 0.25], tags: [a, b]}
"""


def test_sweep_expands_to_a_grid(write_config):
    exp = load_config(write_config(SWEEP))
    points = exp.points()
    # fp32: 2 models × 2 calibration sizes; scale: 3 factors × 2 models × 2 sizes
    assert len(points) == 4 + 12
    factors = sorted({p.params.factor for p in points if p.method_label == "scale_weights"})
    assert factors == [0.25, 0.5, 1.0]
    # a list for a list-typed field is one value, not a sweep
    assert all(p.params.tags == ["a", "b"] for p in points if p.method_label == "scale_weights")
    assert len({p.id for p in points}) == len(points)
    assert len({p.folder for p in points}) == len(points)


def test_lists_inside_a_nested_block_sweep_too(write_config):
    text = GOOD.replace("  - fp32\n", "  - name: qat\n    params: {w_bits: [4, 8], train: {lr: [1.0e-4, 1.0e-3], "
                                      "batch_size: 32, epochs: [1, 2]}}\n")
    points = load_config(write_config(text)).points()
    grid = sorted((p.params.w_bits, p.params.train.lr, p.params.train.epochs) for p in points)
    assert grid == sorted((w, lr, e) for w in (4, 8) for lr in (1e-4, 1e-3) for e in (1, 2))
    assert all(p.params.train.batch_size == 32 for p in points)
    assert len({p.id for p in points}) == 8
    # a bad value inside the nested block still names its key path
    bad = text.replace("epochs: [1, 2]", "epochs: [1, zero]")
    assert_config_error(write_config(bad, "bad.yaml"), "methods[0].params.train.epochs")


def test_point_ids_are_stable_and_depend_on_resolved_config(write_config, tmp_path):
    a = [p.id for p in load_config(write_config(SWEEP)).points()]
    b = [p.id for p in load_config(write_config(SWEEP, "again.yaml")).points()]
    assert a == b
    # writing a default explicitly resolves to the same point
    explicit = SWEEP.replace("tags: [a, b]", "tags: [a, b], noise: 0.0")
    assert [p.id for p in load_config(write_config(explicit, "c.yaml")).points()] == a
    changed = SWEEP.replace("size: [64, 128]", "size: [64, 256]")
    assert [p.id for p in load_config(write_config(changed, "d.yaml")).points()] != a


def test_dry_run_prints_points(write_config):
    code, out = cli("run", write_config(SWEEP), "--dry-run")
    assert code == 0, out
    assert "16 point(s)" in out
    assert "factor=0.25" in out


def test_seed_shorthand(write_config):
    exp = load_config(write_config(GOOD + "seed: 7\n"))
    assert exp.points()[0].seeds == [7]
    exp = load_config(write_config(GOOD + "seeds: [1, 2, 3]\n", "b.yaml"))
    assert exp.points()[0].seeds == [1, 2, 3]


def test_config_error_is_a_qcard_error(write_config):
    with pytest.raises(ConfigError):
        load_config(write_config(GOOD.replace("fp32", "nope")))


def test_shipped_json_schema_is_current():
    shipped = Path(__file__).parent.parent / "qcard" / "schemas" / "config.schema.json"
    assert json.loads(shipped.read_text()) == json.loads(json.dumps(config_json_schema())), \
        "run `make schema` to refresh qcard/schemas/config.schema.json"


def test_reserved_model_kwargs(write_config):
    text = GOOD.replace("models: [qcard:lenet5]", "models: [{ref: qcard:lenet5, kwargs: {num_classes: 3}}]")
    assert_config_error(write_config(text), "models[0].kwargs", "num_classes")


def test_union_annotations_of_both_spellings_are_understood():
    from typing import List, Optional
    from qcard.config import _accepts_list, _nested_model
    from qcard.training import TrainRecipe
    assert _accepts_list(Optional[List[int]]) and _accepts_list(list[int] | None)
    assert not _accepts_list(int | None)
    assert _nested_model(Optional[TrainRecipe]) is TrainRecipe and _nested_model(TrainRecipe | None) is TrainRecipe
    assert _nested_model(int | None) is None


def test_architecture_only_models_refuse_bundled_or_pretrained_weights(write_config):
    for extra in ("weights: bundled", "pretrained: true"):
        text = GOOD.replace("models: [qcard:lenet5]", f"models: [{{ref: qcard:resnet20_cifar, {extra}}}]")
        assert_config_error(write_config(text, f"{extra[:4]}.yaml"), "models[0]", "architecture only")


POINTS_SWEEP = """\
experiment: t
description: a sweep
models: [qcard:lenet5, {ref: qcard:mlp, label: M}]
dataset: {ref: qcard:mnist5k, eval_size: 100, calibration: {size: [32, 64]}}
methods:
  - {name: ptq, label: w4, params: {w_bits: [4, 8], w_granularity: per_channel}}
  - {name: ptq, params: {preset: tensorrt}, deploy: {threads: 2}}
"""


def test_a_point_as_config_loads_back_to_the_same_point(tmp_path, write_config):
    """card.point.config is what `qcard verify` reruns: alone, it must give exactly the same point."""
    import yaml
    from qcard.config import config_from_dict
    exp = load_config(write_config(POINTS_SWEEP))
    points = exp.points()
    assert len(points) == 2 * 2 * 3
    for point in points:
        again = config_from_dict(json.loads(json.dumps(point.as_config()))).points()
        assert [p.id for p in again] == [point.id]
        assert again[0].method_label == point.method_label and again[0].model.label == point.model.label
        assert again[0].description == "a sweep"
        assert yaml.safe_dump(point.as_config())          # plain data


def test_deploy_block_counts_in_the_id_only_when_asked(write_config):
    plain = load_config(write_config(GOOD)).points()[0]
    asked = load_config(write_config(GOOD + "deploy: {batch_sizes: [1]}\n")).points()[0]
    assert plain.deploy is None and asked.deploy.batch_sizes == [1] and asked.deploy.runtime == "onnxruntime"
    assert plain.id != asked.id
    # a method's own block wins over the experiment's
    exp = load_config(write_config(POINTS_SWEEP + "deploy: {threads: 4}\n"))
    by_label = {p.method_label: p.deploy.threads for p in exp.points()}
    assert by_label == {"w4": 4, "ptq": 2}


@pytest.mark.parametrize("block, fragments", [
    ("deploy: {runtime: tensorrt}", ["deploy.runtime", "onnxruntime"]),
    ("deploy: {batch_sizes: [0]}", ["deploy.batch_sizes"]),
    ("deploy: {threds: 1}", ["deploy", "threds"]),
    ("resources: {gpus_per_point: -1}", ["resources.gpus_per_point"]),
])
def test_deploy_and_resources_blocks_are_checked(write_config, block, fragments):
    assert_config_error(write_config(GOOD + block + "\n"), *fragments)
