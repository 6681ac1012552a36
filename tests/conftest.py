import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
ROOT = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


@pytest.fixture
def write_config(tmp_path):
    """Write a YAML config text into tmp_path and return its path."""
    def _write(text: str, name: str = "config.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path
    return _write


@pytest.fixture
def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    return env


# Issue-acceptance runs that train several models from scratch (about 4 minutes on an idle 2-core
# machine) are marked slow and run in `make test` and CI; `make test-fast` deselects them, and
# QCARD_SKIP_ACCEPTANCE=1 skips them visibly (with this reason) in any run.
ACCEPTANCE_MODULES = {"test_marvin_acceptance.py", "test_sparq_ablation.py"}


def pytest_collection_modifyitems(config, items):
    if os.environ.get("QCARD_SKIP_ACCEPTANCE") != "1":
        return
    skip = pytest.mark.skip(reason="issue-acceptance run (MARViN trainings ~4 min, SPARQ ablation ~1 min "
                                   "on 2 idle cores) skipped: QCARD_SKIP_ACCEPTANCE=1")
    for item in items:
        if item.path.name in ACCEPTANCE_MODULES:
            item.add_marker(skip)
