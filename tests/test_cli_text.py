"""Terminal text of the CLI (issue 15 item 17): `qcard methods` ends with a user-method example in
the config's own syntax (an entry of the `methods:` list), as plain text."""
import yaml
from click.testing import CliRunner

from qcard.cli import main
from qcard.config import MethodSpec


def test_methods_footer_is_a_valid_methods_entry():
    r = CliRunner().invoke(main, ["methods"])
    assert r.exit_code == 0
    assert "`" not in r.output                        # no Markdown on a terminal
    snippet = r.output[r.output.index("  methods:"):]
    entries = yaml.safe_load(snippet)["methods"]
    (entry,) = entries
    spec = MethodSpec(**entry)
    assert spec.name == "my_pkg.my_module:MyMethod" and spec.params == {"alpha": 0.1}
