"""The `gencli` command group. Domain errors become one-line messages here, and only here."""

from __future__ import annotations

import importlib

import click

from gencli import __version__
from gencli.model.errors import GencliError

# name -> "module:attribute": a command's module is imported only when that command runs (or help
# lists it), so `gencli submit` and `gencli tail` start without loading torch.
COMMANDS = {
    "generate": "gencli.cli.generate:generate",
    "submit": "gencli.cli.queue:submit",
    "tail": "gencli.cli.queue:tail",
    "status": "gencli.cli.queue:status",
    "list": "gencli.cli.queue:list_jobs",
    "show": "gencli.cli.queue:show",
    "results": "gencli.cli.queue:results",
    "cancel": "gencli.cli.queue:cancel",
    "retry": "gencli.cli.queue:retry",
    "worker": "gencli.cli.workers:worker",
    "workers": "gencli.cli.workers:workers",
    "prep": "gencli.cli.prep:prep",
    "regen": "gencli.cli.regen:regen",
    "train": "gencli.cli.train:train",
    "demo": "gencli.cli.demo:demo",
}


class Group(click.Group):
    """Imports subcommands on first use (click's lazy-loading pattern); GencliError -> one line."""

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *COMMANDS])

    def get_command(self, ctx, name):
        if name in COMMANDS and name not in self.commands:
            module, attr = COMMANDS[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)

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
