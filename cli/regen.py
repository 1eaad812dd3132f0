"""`gencli regen`: regenerate a whole set of datasets as queued prep jobs, one per dataset.

The config (default `datasets.toml`) lists the datasets; `[defaults]` applies to each:

    [defaults]
    format = "chatml"
    tokenizer = "cl100k_base"

    [[datasets]]
    name = "chitchat"             # a label (default: the out dir's name)
    source = "chitchat"           # chat | chitchat | dailydialog
    out = "data/chitchat-chatml"  # relative paths are relative to the config file
    paths = []                    # source files/dirs (chitchat: the package's own by default)

A dataset whose inputs and flags did not change since its last prep is left as it is (the job
reports it up to date) unless --force.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from gencli.cli.queue import _client, _tail
from gencli.model.errors import GencliError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_config(path: Path) -> list[tuple[str, object]]:
    """(name, PrepSpec) of every dataset in the config, all checked before anything is queued."""
    from gencli.prep.spec import PrepSpec

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GencliError(f"{path}: no such config file (see gencli regen --help for its format)") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise GencliError(f"{path}: not valid TOML: {e}") from None
    defaults = data.get("defaults", {})
    datasets = data.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise GencliError(f"{path}: no [[datasets]] tables: list at least one dataset")
    unknown = set(data) - {"defaults", "datasets"}
    if unknown:
        raise GencliError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}: use [defaults] and [[datasets]]")
    base = path.parent
    out = []
    for n, entry in enumerate(datasets, start=1):
        d = dict(defaults, **entry)
        name = str(d.pop("name", "") or Path(str(d.get("out", f"dataset-{n}"))).name)
        paths = d.pop("path", None) or d.pop("paths", None) or []
        if isinstance(paths, str):
            paths = [paths]
        d["paths"] = tuple(str((base / p).resolve()) for p in paths)
        for p in d["paths"]:
            if not Path(p).exists():
                raise GencliError(f"{path}: dataset {n} ({name}): {p}: no such file or directory")
        if "out" in d:
            d["out"] = str((base / d["out"]).resolve())
        try:
            out.append((name, PrepSpec.from_dict(d)))
        except (GencliError, TypeError, KeyError) as e:
            raise GencliError(f"{path}: dataset {n} ({name}): {e}") from None
    return out


@click.command()
@click.option("--config", "config", type=click.Path(path_type=Path), default=Path("datasets.toml"),
              show_default=True, help="The datasets to regenerate.")
@click.option("--only", multiple=True, help="Only the datasets with this name (repeatable).")
@click.option("--force", is_flag=True, help="Rewrite datasets whose inputs and flags did not change.")
@click.option("--follow", "-f", is_flag=True, help="Tail each job's progress until it ends.")
@click.pass_context
def regen(ctx, config, only, force, follow):
    """Queue one prep job per dataset in the config; print their ids.

    \b
    The config is TOML; [defaults] applies to each dataset:
      [defaults]
      format = "chatml"              # chatml | legacy
      tokenizer = "cl100k_base"
      [[datasets]]
      name = "chitchat"              # a label (default: the out dir's name)
      source = "chitchat"            # chat | chitchat | dailydialog
      out = "data/chitchat-chatml"   # relative to the config file
      paths = []                     # source files/dirs (chitchat: the package's own)
    Any other `gencli prep` flag may be a key (val_fraction, loss_mask, ...): see
    examples/datasets.toml. Needs a worker serving dataset prep (gencli worker --prep).
    """
    datasets = read_config(config)
    if only:
        missing = set(only) - {name for name, _ in datasets}
        if missing:
            raise GencliError(f"{config}: no dataset named {', '.join(sorted(missing))}")
        datasets = [(name, spec) for name, spec in datasets if name in only]
    client = _client()
    jobs = []
    for name, spec in datasets:
        job = client.submit_prep(spec, force=force)
        jobs.append(job)
        click.echo(f"{job.id}  {name} -> {spec.out}")
    if follow:
        codes = [_tail(client, job.id, line=None, after=0, cancel_on_interrupt=False) for job in jobs]
        ctx.exit(max(codes))
