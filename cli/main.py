"""The `gencli` command group. Domain errors become one-line messages here, and only here."""

from __future__ import annotations

import importlib

import click

from gencli import __version__
from gencli.model.errors import GencliError

# name -> ("module:attribute", its help's first line): a command's module is imported only when that
# command runs or its own help is asked for, so `gencli --help`, `gencli submit` and `gencli tail`
# start without loading torch. tests/test_packaging.py checks each summary against the command's help.
COMMANDS = {
    "generate": ("gencli.cli.generate:generate", "Generate text on this machine, streaming tokens as they are made."),
    "submit": ("gencli.cli.queue:submit", "Queue a generation job; print its id at once."),
    "tail": ("gencli.cli.queue:tail", "Follow a job's tokens live, from its first token, to its final status."),
    "status": ("gencli.cli.queue:status",
               "Live workers (device, model, running jobs), queue depths, and queues nobody serves."),
    "list": ("gencli.cli.queue:list_jobs", "Recent jobs with status, model, worker/device, tokens and tokens/s."),
    "show": ("gencli.cli.queue:show", "A job's parameters, each prompt and output, and its error."),
    "results": ("gencli.cli.queue:results",
                "A job's outputs: jsonl lines {custom_id, prompt, output, finish_reason, usage, "
                "provenance}, or text."),
    "score": ("gencli.cli.score:score",
              "Queue a scoring job: each line's log-likelihood and perplexity; print its id at once."),
    "replay": ("gencli.cli.replay:replay",
               "Run a job's lines again from their records and compare each output byte for byte."),
    "cancel": ("gencli.cli.queue:cancel",
               "Cancel a job: a queued one never runs, a running one stops within a few tokens."),
    "retry": ("gencli.cli.queue:retry", "Run a finished job's failed or cancelled lines again."),
    "worker": ("gencli.cli.workers:worker",
               "Serve one model's jobs on one device, and/or dataset prep, until stopped (SIGTERM finishes the running jobs)."),
    "workers": ("gencli.cli.workers:workers",
                "Start one pinned worker per GPU (or N CPU workers) and restart any that dies."),
    "prep": ("gencli.cli.prep:prep",
             "Tokenize SOURCE (chat, chitchat, dailydialog) into train.bin/val.bin and meta.json."),
    "regen": ("gencli.cli.regen:regen", "Queue one prep job per dataset in the config; print their ids."),
    "train": ("gencli.cli.train:train",
              "Train a GPT on a prep output; the checkpoint in --out is served as it is."),
    "serve": ("gencli.cli.serve:serve",
              "Serve the HTTP API: gencli's jobs, OpenAI's completions, chat and Batch API."),
    "health": ("gencli.cli.health:health",
               "Exit 0 when a worker on this host beats in Redis, or with --url, when the API there is healthy."),
    "redis": ("gencli.cli.redis_cmd:redis_group", "The private Redis gencli starts when none answers: status, stop."),
    "demo": ("gencli.cli.demo:demo",
             "Prep chitchat, train a tiny model once, serve it, and stream replies to a few prompts."),
}


EXIT_INTERRUPTED = 130


class Group(click.Group):
    """Imports subcommands on first use (click's lazy-loading pattern); GencliError -> one line;
    Ctrl-C -> exit status 130 (click's own says "Aborted!" with 1)."""

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *COMMANDS])

    def get_command(self, ctx, name):
        if name in COMMANDS and name not in self.commands:
            module, attr = COMMANDS[name][0].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx, formatter):
        """The command list from the summaries above: listing commands imports none of them."""
        limit = formatter.width - 6 - max(len(name) for name in self.list_commands(ctx))
        rows = []
        for name in self.list_commands(ctx):
            loaded = name not in COMMANDS or name in self.commands
            cmd = self.get_command(ctx, name) if loaded else click.Command(name, help=COMMANDS[name][1])
            rows.append((name, cmd.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except GencliError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:  # Ctrl-C where a command has no handling of its own: 130, as shells expect
            click.echo("\n[interrupted]", err=True)
            ctx.exit(EXIT_INTERRUPTED)


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
