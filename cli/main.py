"""The `gencli` command group. Domain errors become one-line messages here, and only here."""

from __future__ import annotations

import click

from gencli import __version__
from gencli.cli.demo import demo
from gencli.cli.generate import generate
from gencli.cli.prep import prep
from gencli.cli.queue import (
    cancel,
    list_jobs,
    results,
    retry,
    show,
    status,
    submit,
    tail,
)
from gencli.cli.regen import regen
from gencli.cli.train import train
from gencli.cli.workers import worker, workers
from gencli.model.errors import GencliError


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GencliError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=Group)
@click.version_option(__version__, prog_name="gencli")
def main():
    """Queue-backed text generation for small GPT models."""


@main.command("init-model")
@click.argument("out", type=click.Path())
@click.option("--preset", type=click.Choice(["tiny", "small", "gpt2"]), default="tiny", show_default=True)
@click.option("--tokenizer", default="cl100k_base", show_default=True)
@click.option("--chat-format", "--chat_format", "chat_format", type=click.Choice(["chatml", "legacy"]),
              default="chatml", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def init_model(out, preset, tokenizer, chat_format, seed):
    """Write a randomly initialised model in gencli's format (to try the pipeline end to end)."""
    from gencli.model.checkpoint import create_model

    path = create_model(out, preset=preset, tokenizer=tokenizer, chat_format=chat_format, seed=seed)
    click.echo(f"wrote untrained {preset} model ({tokenizer}, {chat_format}) to {path}")


for command in (generate, submit, tail, status, list_jobs, show, results, cancel, retry, worker, workers, prep,
                regen, train, demo):
    main.add_command(command)
