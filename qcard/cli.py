"""The qcard command line. Heavy modules (torch, pandas) are imported inside commands only,
so `qcard --help` stays fast. Exit codes: 0 ok, 1 some points failed, 2 bad usage or bad config."""
from __future__ import annotations

import importlib
import json
import sys

import click

from .commands import user_errors
from .version import __version__

# subcommands kept in their own module: name -> "module:attr"
LAZY_COMMANDS = {
    "cost": "qcard.commands.cost:cost",
    "render": "qcard.commands.render:render",
    "compare": "qcard.commands.compare:compare",
    "export": "qcard.commands.export:export",
    "verify": "qcard.commands.verify:verify",
    "site": "qcard.commands.site:site",
    "clean": "qcard.commands.clean:clean",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS:
            module, _, attr = LAZY_COMMANDS[name].partition(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except ImportError as exc:
                reason = f"command '{name}' is not available in this installation: {exc}"

                def unavailable():
                    raise click.ClickException(reason)
                return click.Command(name, callback=unavailable, help=f"(unavailable: {exc})")
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qcard")
def main():
    """qcard — quantization benchmarks that report every choice on a quantization card.

    \b
    Quick start:
      qcard run configs/quickstart.yaml        # writes runs/quickstart/*/card.md
      qcard run CONFIG --dry-run               # list the points of a sweep
      qcard cost qcard:resnet8 --w-bits 4      # cost of a model, no data needed
    """


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="output root, relative to the current folder (default: the config's 'out', relative to the config's "
                   "folder; else runs/ in the current folder)")
@click.option("--force", is_flag=True, help="rerun points that are already finished")
@click.option("--dry-run", is_flag=True, help="validate and print the points and the work each implies (eval images, "
                                           "calibration passes, training steps, reconstruction iterations × units) "
                                           "without running them")
@click.option("--estimate", is_flag=True, help="a dry run with a short timing probe on this machine (a few batches "
                                            "of each model): prints each point's estimated wall time and the total")
@click.option("--only", multiple=True, metavar="ID", help="run only points whose id starts with ID (repeatable)")
@click.option("--progress/--no-progress", default=None, help="progress bars (default: when stderr is a terminal)")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="points run in parallel processes, each with CPU threads / N torch threads (no progress bars)")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="where points run: this machine (in-process, or --workers N processes), or tasks on a Ray "
                   "cluster (needs qcard[ray]; resources per point from the config's resources: block)")
@click.option("--address", metavar="ADDR", default=None,
              help="with --executor ray: the cluster, auto | HOST:PORT | ray://HOST:PORT (default: start a "
                   "local Ray)")
@click.option("--max-retries", type=click.IntRange(min=0), default=None,
              help="with --executor ray: retry a point whose task failed (worker died or raised) N times, then "
                   "write its failed card  [default: 1]")
@user_errors
def run(config, out, force, dry_run, estimate, only, progress, workers, executor, address, max_retries):
    """Run every point of CONFIG and write one card per point.

    \b
    Example:
      qcard run configs/quickstart.yaml --out /tmp/runs
    Finished points are skipped on a rerun; a failed point is recorded as a failed card and
    the others go on (exit code 1 at the end).
    """
    from .config import load_config
    exp = load_config(config)
    if dry_run or estimate:
        _echo_warnings(exp)
        points = exp.points()
        if only:
            points = [p for p in points if any(p.id.startswith(o) for o in only)]
        click.echo(f"experiment '{exp.name}': {len(points)} point(s) -> {exp.out_dir(out)}")
        from .planning import plan_points, total_lines, work_lines
        if estimate:
            click.echo("timing a few batches of each model on this machine ...", err=True)
        plans = plan_points(exp, points, estimate=estimate)
        for p, plan in zip(points, plans):
            click.echo("  " + p.describe())
            for line in work_lines(plan):
                click.echo("      " + line)
        for line in total_lines(plans, plans[0].facts.device if plans else "cpu"):
            click.echo(line)
        return
    from .runner import run as run_experiment
    summary = run_experiment(exp, out=out, force=force, only=list(only) or None, progress=progress,
                             workers=workers, executor=executor, address=address, max_retries=max_retries)
    if not summary.ok:
        sys.exit(1)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--no-build", is_flag=True, help="skip building the models and loading the data (checks keys, "
                                              "names and files only)")
@user_errors
def validate(config, no_build):
    """Check CONFIG without running anything: keys, types, names, files, the extras it needs (qcard[deploy]),
    and, building each model and loading its data, what would fail every point (the model's outputs vs
    the dataset's classes, channels, a calibration size larger than the training split)."""
    from .config import load_config
    from .deploy import check_extra
    exp = load_config(config)
    _echo_warnings(exp)
    from .errors import QcardError
    try:
        check_extra(any(p.deploy is not None for p in exp.points()))
    except QcardError as exc:   # what `qcard run` would stop at: said here, with the config it comes from
        raise QcardError(f"{config}: a deploy: block asks for the deploy check, but {exc}") from None
    built = ""
    if not no_build:
        from .runner import preflight
        n = preflight(exp, log=lambda m: click.echo(m, err=True))
        built = f"; {n} model(s) built and checked against the data"
    click.echo(f"{config}: ok — experiment '{exp.name}', {len(exp.points())} point(s){built}")


def _echo_warnings(exp) -> None:
    for w in exp.warnings:
        click.echo(f"warning: {w}", err=True)


@main.command()
def methods():
    """List the registered quantization methods."""
    from .methods import METHODS
    names = METHODS.names()
    width = max(map(len, names), default=0) + 2
    for name in names:
        click.echo(f"{name:<{width}}{METHODS.doc(name)}")
    # plain text for the terminal (no Markdown), in the config's own syntax: an entry of its `methods:` list
    click.echo("\nA method of your own (a subclass of qcard.methods.base.Method, importable from PYTHONPATH)\n"
               "is an entry of the config's methods: list, named by module and class:\n"
               "  methods:\n"
               "    - {name: \"my_pkg.my_module:MyMethod\", params: {alpha: 0.1}}")


@main.command()
def profiles():
    """List the hardware cost profiles."""
    from .commands.cost import profile_lines
    click.echo("\n".join(profile_lines()))


@main.command()
def presets():
    """List the hardware backend presets and the scheme each one fixes."""
    from .quant.presets import list_presets
    for row in list_presets():
        settings = ", ".join(f"{k}={v}" for k, v in row["settings"].items())
        allowed = ", ".join(f"{k} in {v}" for k, v in row.get("allowed", {}).items())
        click.echo(f"{row['name']:<9} {row['hardware']}\n          {settings}" + (f"; {allowed}" if allowed else ""))


@main.group()
def zoo():
    """The bundled models: list them, or retrain one."""


@zoo.command("list")
@user_errors
def zoo_list():
    """List the bundled models with their FP32 accuracy."""
    from .zoo import list_models
    rows = list_models()
    for r in rows:
        acc = r.get("test_accuracy")
        acc_s = f"{100 * acc:.1f} %" if isinstance(acc, (int, float)) else "—"   # stored as a fraction
        params = f"{r['params']:,}" if r.get("params") else "—"
        if r.get("architecture_only"):
            shape = "x".join(str(d) for d in r["input_shape"])
            click.echo(f"{r['ref']:<22} {'—':>9} params  {shape} input, architecture only (train from scratch "
                       f"or give weights: PATH)  {r.get('description', '')}")
            continue
        state = "" if r.get("weights_bytes") else "  (no bundled weights: run `qcard zoo train " + r["name"] + "`)"
        click.echo(f"{r['ref']:<22} {params:>9} params  top1 {acc_s:>8}  {r.get('description', '')}{state}")


@zoo.command("train")
@click.argument("name")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="override the recipe's epoch count")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="folder to write NAME.safetensors and NAME.json into (default: write nothing; the "
                   "record is printed, and the installed bundled weights are never overwritten)")
@user_errors
def zoo_train(name, epochs, seed, out_dir):
    """Retrain bundled model NAME deterministically on qcard:mnist5k."""
    from .zoo import train_model
    info = train_model(name, epochs=epochs, seed=seed, out_dir=out_dir, progress=sys.stderr.isatty())
    click.echo(json.dumps(info, indent=2, default=str))


@main.group()
def card():
    """Card files: validate them."""


@card.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@user_errors
def card_validate(paths):
    """Check each card FILE, and every card.json under each FOLDER: against the card schema, and its
    figures against its own per-sample outcomes (every top-1, Δ, std and 95 % interval recomputed).

    Every bad file is reported (not only the first), each mismatch on one line: file, field, stored value,
    the value the outcomes give. Exit code 2 when a file cannot be read as a card; else 1 when a card
    disagrees with its outcomes; 0 when all agree. Cards without outcomes (schema 1, failed cards) are
    valid and say that their figures were not checked."""
    from .cards.compare import find_card_files
    from .cards.evidence import NO_EVIDENCE, check_card
    from .cards.schema import load_card
    from .errors import QcardError
    checked, unreadable, mismatched = 0, 0, 0
    for path in paths:
        try:
            files = find_card_files([path])
        except QcardError as exc:
            unreadable += 1
            click.echo(f"error: {exc}", err=True)
            continue
        for f in files:
            checked += 1
            try:
                c = load_card(f, check_evidence=False)
            except QcardError as exc:
                unreadable += 1
                click.echo(f"error: {exc}", err=True)
                continue
            evidence = check_card(c)
            for line in evidence.lines(str(f)):
                click.echo(f"mismatch: {line}", err=True)
            for w in evidence.warnings:
                click.echo(f"warning: {f}: {w}", err=True)
            if not evidence.ok:
                mismatched += 1
                continue
            what = "figures agree with the per-sample outcomes" if evidence.checked else NO_EVIDENCE
            click.echo(f"{f}: ok (schema v{c.schema_version}, status {c.status}; {what})")
    if unreadable or mismatched:
        click.echo(f"{unreadable + mismatched} problem(s) among {len(paths)} path(s), {checked} card file(s) "
                   f"checked" + (f"; {mismatched} card(s) disagree with their own outcomes" if mismatched else ""),
                   err=True)
        sys.exit(2 if unreadable else 1)


@main.command()
@click.argument("what", type=click.Choice(["config", "card"]))
def schema(what):
    """Print the JSON Schema of the config or card format (for editors and other tools)."""
    if what == "config":
        from .config import config_json_schema
        click.echo(json.dumps(config_json_schema(), indent=2))
    else:
        from .cards.schema import card_json_schema
        click.echo(json.dumps(card_json_schema(), indent=2))


if __name__ == "__main__":
    main()
