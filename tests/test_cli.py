"""The command line: help without torch, version, listings, exit codes."""
import json
import subprocess
import sys

from click.testing import CliRunner

from qcard import __version__
from qcard.cli import main


def invoke(*args):
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.output


def test_help_does_not_import_torch(subprocess_env):
    code = ("import sys; from qcard.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in ('torch', 'pandas', 'matplotlib') if m in sys.modules]\n"
            "print('HEAVY', bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env, timeout=60)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
    assert "run" in out.stdout and "compare" in out.stdout and "cost" in out.stdout


def test_version():
    code, out = invoke("--version")
    assert code == 0 and __version__ in out


def test_methods_lists_fp32_and_ptq():
    code, out = invoke("methods")
    assert code == 0 and "fp32" in out and "ptq" in out


def test_profiles_lists_bitops():
    code, out = invoke("profiles")
    assert code == 0 and "bitops" in out and "asic45" in out


def test_zoo_list_shows_bundled_models():
    code, out = invoke("zoo", "list")
    assert code == 0, out
    assert "qcard:lenet5" in out


def test_schemas_are_json():
    for what in ("config", "card"):
        code, out = invoke("schema", what)
        assert code == 0
        assert json.loads(out)["title"].startswith("qcard")


def test_card_validate_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, out = invoke("card", "validate", str(bad))
    assert code == 2 and "not valid JSON" in out
    bad.write_text(json.dumps({"schema_version": "9"}))
    code, out = invoke("card", "validate", str(bad))
    assert code == 2 and "schema version '9'" in out


def test_unknown_command_is_usage_error():
    code, out = invoke("frobnicate")
    assert code == 2


# ------------------------------------------------------------------ issue 22 item 7: export refuses from the card

def test_export_refuses_a_not_deployable_card_without_rerunning_it(tmp_path, monkeypatch):
    import shutil
    from pathlib import Path
    import qcard.commands.export as export_cmd
    cards = Path(__file__).parent.parent / "cards" / "quickstart"
    qat = next(cards.glob("resnet8__QAT-W4A4__*"))
    shutil.copytree(qat, tmp_path / "qat")

    def rerun(*args, **kwargs):
        raise AssertionError("the point was rerun before refusing")
    monkeypatch.setattr(export_cmd, "rebuild_simulated", rerun)
    code, out = invoke("export", str(tmp_path / "qat"), "-o", str(tmp_path / "m.onnx"))
    assert code == 2, out
    assert "not deployable" in out and "4-bit activations" in out and "nothing was rerun" in out
    assert "rerunning" not in out and not (tmp_path / "m.onnx").exists()


def test_card_problem_reads_what_the_card_says_and_passes_deployable_ones():
    from pathlib import Path
    from qcard.deploy.check import card_problem
    cards = Path(__file__).parent.parent / "cards" / "quickstart"
    said = {p.parent.name.split("__")[1]: card_problem(json.loads(p.read_text())) for p in cards.glob("resnet8__*/card.json")}
    assert said["W8A8"] is None and said["W4A8-minmax"] is None          # exported by the export itself
    assert "4-bit activations" in said["QAT-W4A4"]
    assert "SPARQ" in said["SPARQ-A4W8"] and "MARViN" in said["MARViN"] and "FP32 point" in said["fp32"]


# ------------------------------------------------------------------ issue 22 item 6: validate finds what fails every point

VALIDATE = """\
experiment: v
models: [{model}]
dataset: {{ref: qcard:mnist5k, eval_size: 32, calibration: {{size: {cal}}}}}
methods: [fp32, {{name: ptq, params: {{w_bits: 8, a_bits: 8}}}}]
"""


def test_validate_builds_the_models_and_checks_them_against_the_data(write_config):
    ok = write_config(VALIDATE.format(model="qcard:lenet5", cal=256), "ok.yaml")
    code, out = invoke("validate", str(ok))
    assert code == 0 and "1 model(s) built and checked" in out, out
    wrong = write_config(VALIDATE.format(model="{ref: qcard:lenet5, weights: random, num_classes: 7}", cal=256),
                         "classes.yaml")
    code, out = invoke("validate", str(wrong))
    assert code == 2, out
    assert "classes.yaml:2: models[0]" in out and "7 outputs" in out and "10 class(es)" in out
    big = write_config(VALIDATE.format(model="qcard:lenet5", cal=5000), "cal.yaml")
    code, out = invoke("validate", str(big))
    assert code == 2 and "dataset.calibration.size" in out and "4000 images" in out, out
    assert invoke("validate", "--no-build", str(big))[0] == 0       # keys and files alone are fine


def test_validate_names_the_missing_deploy_extra(write_config, monkeypatch):
    cfg = write_config(VALIDATE.format(model="qcard:lenet5", cal=256).replace(
        "params: {w_bits: 8, a_bits: 8}", "params: {w_bits: 8, a_bits: 8}, deploy: {threads: 1}"), "dep.yaml")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)        # not installed
    code, out = invoke("validate", "--no-build", str(cfg))
    assert code == 2 and "qcard[deploy]" in out and "dep.yaml" in out, out
