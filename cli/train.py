"""`gencli train`: train, fine-tune (--init-from) or resume (--resume) a model on a prep output."""

from __future__ import annotations

import sys

import click
import torch

from gencli.cli.main import EXIT_INTERRUPTED
from gencli.model.checkpoint import PRESETS
from gencli.model.errors import GencliError
from gencli.model.train import Step, TrainConfig, reuse_freed_memory, saved_config
from gencli.model.train import train as run_training


def _opt(name: str, help: str = "", **kw):
    """A TrainConfig option spelled with hyphens or underscores, like the other commands' options.

    Its default is None, so that --resume can tell what was given from what was not; the help
    shows TrainConfig's default.
    """
    dest = name.replace("-", "_")
    spellings = dict.fromkeys([f"--{name}", f"--{dest}"])
    default = getattr(TrainConfig, dest, None)
    if default is not None:
        help = f"{help}  [default: {default}]".strip()
    return click.option(*spellings, dest, default=None, help=help, **kw)


@click.command()
@click.option("--data", "data_dir", required=True, type=click.Path(), help="A `gencli prep` output directory.")
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Checkpoint directory to write.")
@_opt("preset", type=click.Choice(list(PRESETS)), help="Shape of a new model.")
@_opt("max-iters", type=int, help="Training iterations in all.")
@_opt("batch-size", type=int, help="Sequences per step.")
@_opt("block-size", type=int, help="Tokens per sequence.  [default: the model's context]")
@_opt("lr", type=float, help="Peak learning rate.")
@_opt("min-lr", type=float, help="Learning rate at the end of the cosine decay.")
@_opt("warmup-iters", type=int)
@_opt("eval-interval", type=int, help="Iterations between evals (and saves).")
@_opt("eval-iters", type=int, help="Batches per split in an eval.")
@click.option("--init-from", "--init_from", "init_from", type=click.Path(), help="Fine-tune this checkpoint (gencli, nanoGPT or Hugging Face).")
@click.option("--resume", is_flag=True, help="Continue the run saved in --out.")
@click.option("--assistant-only", "--assistant_only", "assistant_only", is_flag=True,
              help="Loss on assistant tokens only (needs prep's mask files).")
@_opt("device", help="auto, cpu, cuda, cuda:N or mps.")
@_opt("dtype", type=click.Choice(["auto", "float32", "bfloat16"]),
      help="Matmul precision; auto is bfloat16 where the hardware has it.")
@_opt("seed", type=int)
def train(data_dir, out_dir, resume, init_from, assistant_only, **options):
    """Train a GPT on a prep output; the checkpoint in --out is served as it is.

    Defaults are the tiny preset's run (2 to 4 minutes on 2 CPU cores); with --resume, those
    of the run being resumed. Ctrl-C stops; --resume continues from the last save.
    """
    if resume and init_from is not None:
        raise GencliError("give --resume or --init-from, not both")
    cfg = saved_config(out_dir) if resume else TrainConfig()
    for name, value in options.items():
        if value is not None:
            setattr(cfg, name, value)
    cfg.assistant_only = cfg.assistant_only or assistant_only
    reuse_freed_memory()
    bar = TrainProgress()
    try:
        result = run_training(data_dir, out_dir, cfg, init_from=init_from, resume=resume, progress=bar)
    except KeyboardInterrupt:
        bar.close()
        click.echo(f"\ninterrupted: {out_dir} holds the last save (--resume continues from it)", err=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except torch.OutOfMemoryError:
        raise GencliError("out of memory: lower --batch-size or --block-size") from None
    finally:
        bar.close()
    click.echo(f"val loss {result.val_loss:.4f} vs unigram baseline {result.baseline:.4f} "
               f"(train loss {result.train_loss:.4f}; {result.tokens_per_s:,.0f} tokens/s, "
               f"{result.elapsed_s:.0f} s)")
    click.echo(f"checkpoint (iter {result.iters}): {result.path}")


class TrainProgress:
    """tqdm on stderr: iterations with ETA, the loss and tokens/s beside it; evals, saves and notes
    printed above the bar as lines."""

    def __init__(self):
        self.bar = None

    def __call__(self, event) -> None:
        if isinstance(event, Step):
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=event.max_iters, initial=event.start_iter, unit="iter", desc="train",
                                dynamic_ncols=True, leave=True, file=sys.stderr)
            self.bar.update(event.iter - self.bar.n)
            self.bar.set_postfix_str(f"loss {event.loss:.4f}, lr {event.lr:.1e}, {event.tokens_per_s:,.0f} tok/s")
        elif self.bar is not None:
            self.bar.write(str(event), file=sys.stderr)
        else:
            click.echo(str(event), err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
