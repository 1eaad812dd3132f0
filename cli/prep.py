"""`gencli prep`: a dataset into nanoGPT token files on this machine, with a progress bar."""

from __future__ import annotations

import os

import click

from gencli.prep.run import prepare
from gencli.prep.spec import FORMATS, SOURCES, PrepSpec


@click.command()
@click.argument("source", type=click.Choice(SOURCES))
@click.option("--path", "paths", multiple=True,
              help="Input file or folder (repeatable); chitchat defaults to the chitchat-dataset package's data.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="chatml", show_default=True,
              help="Chat format the conversations are rendered in.")
@click.option("--tokenizer", default="cl100k_base", show_default=True,
              help="tiktoken encoding name or .tiktoken ranks file.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--seed", type=int, default=1337, show_default=True, help="Seed of the train/val split.")
@click.option("--val-fraction", "--val_fraction", "val_fraction", type=float, default=0.05, show_default=True,
              help="Share of conversations in val.bin.")
@click.option("--loss-mask", "--loss_mask", "loss_mask", is_flag=True,
              help="Also write <split>.mask.bin: 1 on assistant tokens.")
@click.option("--skip-bad", "--skip_bad", "skip_bad", is_flag=True,
              help="Skip and count malformed conversations instead of failing.")
@click.option("--force", is_flag=True, help="Rebuild even when the output is up to date.")
@click.option("--queue", is_flag=True,
              help="Queue it as a job for a prep worker (gencli worker --prep); print the job id.")
def prep(source, paths, fmt, tokenizer, out, seed, val_fraction, loss_mask, skip_bad, force, queue):
    """Tokenize SOURCE (chat, chitchat, dailydialog) into train.bin/val.bin and meta.json."""
    if queue:  # a worker runs it: its paths must not depend on this shell's directory
        out, paths = os.path.abspath(out), tuple(os.path.abspath(p) for p in paths)
        if os.path.exists(tokenizer):
            tokenizer = os.path.abspath(tokenizer)
    spec = PrepSpec(source=source, out=out, paths=paths, format=fmt, tokenizer=tokenizer, seed=seed,
                    val_fraction=val_fraction, loss_mask=loss_mask, skip_bad=skip_bad)
    if queue:
        from gencli.worker.client import Client

        click.echo(Client().submit_prep(spec, force=force).id)
        return
    bar = ProgressBar()
    try:
        result = prepare(spec, force=force, progress=bar.update)
    finally:
        bar.close()
    if result.skipped:
        click.echo(f"{out} is up to date (same inputs and flags); --force rebuilds it")
        return
    click.echo(summary(result.meta, out))


class ProgressBar:
    """tqdm on stderr (conversations/s, ETA), made when prepare() first reports the total."""

    def __init__(self):
        self.bar = None

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="conv", desc="prep", dynamic_ncols=True, leave=True)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}{'s' * (n != 1)}"


def summary(meta: dict, out: str) -> str:
    lines = [f"prepared {meta['source']} ({meta['chat_format']}, {meta['tokenizer']}) in {out}:"]
    for name, c in meta["counts"].items():
        lines.append(f"  {name}: {_count(c['conversations'], 'conversation')}, {_count(c['turns'], 'turn')}, "
                     f"{_count(c['tokens'], 'token')}")
    lines.append(f"  dtype {meta['dtype']}; {meta['mean_tokens_per_turn']:.1f} tokens per turn on average")
    literal = sum(meta["literal_special_strings"].values())
    if literal:
        lines.append(f"  {literal} literal special-token strings in the text, encoded as text")
    bad = meta["malformed"]
    if bad["skipped"]:
        lines.append(f"  skipped {bad['skipped']} malformed conversation(s); first: {bad['first'][0]}")
    return "\n".join(lines)
