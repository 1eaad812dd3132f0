"""`gencli generate`: direct generation on this machine, streamed to the terminal.

Ctrl-C stops the sequences decoding now and keeps (and saves) what they made, and the prompts
still waiting go on; a second Ctrl-C stops them all too, and exits with code 130, as does Ctrl-C
at the interactive prompt. An interactive line that is not UTF-8 is refused with one message, and
the chat goes on.
"""

from __future__ import annotations

import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from gencli.cli.display import OrderedPrinter
from gencli.cli.main import EXIT_INTERRUPTED
from gencli.cli.options import extra_sampling, model_options, sampling_options, shaping_options
from gencli.cli.output import ResultWriter
from gencli.model.checkpoint import load_model
from gencli.model.device import describe, resolve_device
from gencli.model.errors import ContextOverflowError, GencliError
from gencli.model.params import SamplingParams, check_overrides, default_max_tokens, resolve_sampling
from gencli.model.textgen import TextGenerator
from gencli.storage.settings import get_settings
from gencli.worker.prompts import PromptItem, read_prompts
from gencli.worker.unicode import invalid_at, what_is_wrong


@dataclass
class Sample:
    """One sample of one prompt, as gencli generate runs it (the engine's own unit is model/engine.py's Sequence)."""

    item: PromptItem
    sample: int  # 0-based sample number of its prompt
    ids: list[int]
    params: SamplingParams  # the command's, with its .jsonl line's own overrides (its seed: the sample's)

    @property
    def label(self) -> str:
        name = f"id {self.item.custom_id}" if self.item.custom_id else f"prompt {self.item.line}"
        return f"{name}, sample {self.sample + 1}"


class LocalGeneration:
    def __init__(self, gen: TextGenerator, params: SamplingParams, *, writer, verbose, model_name):
        self.gen = gen
        self.params = params  # the command's (the interactive chat's)
        self.writer = writer
        self.verbose = verbose
        self.model_name = model_name
        self.interrupts = 0

    def run(self, seqs: list[Sample], batch_size: int) -> None:
        self.run_batch(seqs, len(seqs) > 1, slots=batch_size)

    def run_batch(self, seqs: list[Sample], labelled: bool, slots: int = 1) -> list[str]:
        """Decode seqs on `slots` slots, each joining as another finishes; print them in order."""
        printer = OrderedPrinter([s.label for s in seqs] if labelled else None)
        # Sequences in company compute exactly what each computes alone (Engine's invariant mode);
        # one at a time there is no company, and the one-row kernel is about 1.3-1.4x faster.
        tg = self.gen.stream([s.ids for s in seqs], [s.params for s in seqs], slots=slots,
                             invariant=slots > 1 and len(seqs) > 1)
        t0 = time.perf_counter()
        first = None
        def show(d) -> None:
            printer.feed(d.index, d.text, d.finish_reason is not None)
            if d.finish_reason and self.writer:  # saved as each one ends
                s, st = seqs[d.index], tg.streams[d.index]
                self.writer.save(self.record(s, st.text, st.finish_reason, len(st.ids)))

        try:
            while True:
                try:
                    for deltas in tg:
                        first = first or time.perf_counter()
                        for d in deltas:
                            show(d)
                        for rung in tg.engine.rungs:
                            click.secho(f"[out of memory on {self.gen.loaded.device} at {len(rung.running)} "
                                        f"sequences: going on with {rung.limit}]", err=True, fg="yellow")
                        tg.engine.rungs.clear()
                    break
                except KeyboardInterrupt:  # the first stops the sequences decoding now, the second all
                    self.interrupts += 1
                    for d in tg.cancel(running_only=self.interrupts < 2):
                        if d.seq.cached or d.seq.out:  # one never started is neither shown nor saved
                            show(d)
                    last = self.interrupts >= 2 or not tg.engine
                    hint = "" if last else "; the next prompts go on, Ctrl-C again to quit"
                    click.secho(f"[interrupted: kept what was generated{hint}]", err=True, fg="yellow")
                    if last:
                        break
        except torch.OutOfMemoryError:
            raise GencliError(_oom_message(self.gen.loaded.device)) from None
        elapsed = time.perf_counter() - t0
        tokens = sum(len(s.ids) for s in tg.streams)
        if self.verbose and first is not None:
            click.echo(
                f"[{len(seqs)} sequence(s) on {tg.engine.slots} slot(s): first token after "
                f"{(first - t0) * 1000:.0f} ms, {tokens} token{'s' * (tokens != 1)} in {elapsed:.2f} s, "
                f"{tokens / elapsed:.1f} tokens/s; "
                f"finished: {', '.join(sorted({st.finish_reason or '-' for st in tg.streams}))}]",
                err=True,
            )
        return [st.text for st in tg.streams]

    def record(self, s: Sample, output: str, finish_reason: str | None, n_tokens: int) -> dict:
        return {
            "model": self.model_name,
            "prompt": s.item.prompt,
            "custom_id": s.item.custom_id,
            "sample": s.sample + 1,
            "seed": s.params.seed,
            "output": output,
            "finish_reason": finish_reason,
            "usage": {"prompt_tokens": len(s.ids), "completion_tokens": n_tokens},
            "params": {k: v for k, v in s.params.as_json().items() if k != "seed"},
        }


def _oom_message(device: torch.device) -> str:
    return (
        f"out of memory on {device} generating 1 sequence (fewer at once were tried first): lower --max_tokens, "
        "shorten the prompt, or use --device cpu"
    )


@click.command()
@click.argument("prompt", required=False)
@model_options
@sampling_options
@shaping_options
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (repeatable).")
@click.option("--prompt_file", "--prompt-file", "prompt_file", help="UTF-8 prompt file, - for stdin, .jsonl lines.")
@click.option("--each-line", "--each_line", "each_line", is_flag=True, help="One prompt per line of the file.")
@click.option("--chat", is_flag=True, help="Wrap each prompt in the model's chat format.")
@click.option("--num_samples", "--num-samples", "num_samples", type=click.IntRange(min=1), default=1,
              show_default=True)
@click.option("--batch_size", "--batch-size", "batch_size", type=click.IntRange(min=1), default=1,
              show_default=True, help="Sequences decoded together; the next prompt joins as one finishes.")
@click.option("--out", type=click.Path(path_type=Path), help="Save each result as a JSON file in this dir.")
@click.option("--interactive", "-i", is_flag=True, help="Multi-turn chat (/reset, /exit).")
@click.option("--verbose", "-v", is_flag=True, help="Load time, device, time to first token, tokens/s.")
@click.pass_context
def generate(ctx, prompt, model_path, tokenizer, chat_format, device, dtype, max_tokens, temperature, top_k, top_p,
             seed, stop, truncate, prompts, prompt_file, each_line, chat, num_samples, batch_size, out, interactive,
             verbose):
    """Generate text on this machine, streaming tokens as they are made.

    The prompt: PROMPT, --prompt (repeatable), --prompt_file, or standard input when it is not a
    terminal; or --interactive for a chat."""
    if prompt is not None:
        prompts = (prompt, *prompts)
    if not (prompts or prompt_file is not None or interactive) and not sys.stdin.isatty():
        prompt_file = "-"  # piped in: the whole of stdin is the prompt
    sources = sum([bool(prompts), prompt_file is not None, interactive])
    if sources != 1:
        raise click.UsageError("give exactly one of PROMPT (or --prompt), --prompt_file or --interactive")
    if each_line and prompt_file is None:
        raise click.UsageError("--each-line goes with --prompt_file")
    items = read_prompts(prompts, prompt_file, each_line=each_line)
    writer = ResultWriter(out) if out else None

    t0 = time.perf_counter()
    dev = resolve_device(device)
    loaded = load_model(model_path, tokenizer=tokenizer, chat_format=chat_format, device=dev, dtype=dtype)
    gen = TextGenerator(loaded)
    max_tokens = max_tokens or default_max_tokens(gen.block_size)
    if verbose:
        click.echo(
            f"[loaded {loaded.kind} model {model_path} ({loaded.model.num_params() / 1e6:.1f}M params, "
            f"{loaded.tokenizer.spec_name}, {loaded.chat_format.value}) in {time.perf_counter() - t0:.2f} s "
            f"on {describe(dev)} in {loaded.dtype}]",
            err=True,
        )
    flags = {"max_tokens": max_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed,
             "stop": list(stop)} | extra_sampling(ctx)
    vocab = gen.model.config.vocab_size
    runner = LocalGeneration(gen, resolve_sampling(flags, None, gen.block_size, vocab_size=vocab), writer=writer, verbose=verbose,
                             model_name=str(model_path))
    if interactive:
        try:  # the shortest conversation must fit with max_tokens: found now, not at the first message
            gen.fit(gen.encode([{"role": "user", "content": ""}], chat=True), max_tokens, truncate=False)
        except ContextOverflowError as e:
            raise GencliError(f"--max_tokens {max_tokens} does not fit the interactive chat: {e}") from None
        ctx.exit(chat_loop(runner, truncate=truncate))
    seqs = []
    for item in items:  # a .jsonl line's own parameters, checked as submit checks them
        where = f"{prompt_file}:{item.line}: " if item.extra else ""
        line = check_overrides(item.extra, where) if item.extra else None
        sp = resolve_sampling(flags, line, gen.block_size, where=where, vocab_size=vocab)
        ids = _encode(gen, item, chat=chat, max_tokens=sp.max_tokens, truncate=truncate)
        for k in range(num_samples):
            seqs.append(Sample(item, k, ids, sp.seeded(None if sp.seed is None else sp.seed + k)))
    runner.run(seqs, batch_size)
    if runner.interrupts:
        ctx.exit(EXIT_INTERRUPTED)


def _encode(gen: TextGenerator, item: PromptItem, *, chat: bool, max_tokens: int, truncate: bool) -> list[int]:
    where = f"prompt {item.line}" + (f" ({item.custom_id})" if item.custom_id else "")
    try:
        return gen.fit(gen.encode(item.prompt, chat=chat), max_tokens, truncate=truncate)
    except GencliError as e:
        raise GencliError(f"{where}: {e}") from None


def chat_loop(runner: LocalGeneration, *, truncate: bool) -> int:
    """The interactive chat; returns the exit code."""
    history = _setup_readline()
    if isinstance(sys.stdin, io.TextIOWrapper):  # a line that is not UTF-8 reaches the check below, as in the
        sys.stdin.reconfigure(errors="surrogateescape")  # C locale, rather than raising inside input()
    gen = runner.gen
    messages: list[dict] = []
    turn = 0
    click.echo(f"Chatting in {gen.chat_format.value} format. /reset starts over, /exit quits.", err=True)
    try:
        while True:
            try:
                line = input("> ")
            except KeyboardInterrupt:
                click.echo("")
                return EXIT_INTERRUPTED
            except EOFError:
                click.echo("")
                return 0
            if (at := invalid_at(line)) is not None:
                click.secho(f"error: {what_is_wrong(line, at)} (the line was not sent)", err=True, fg="red")
                continue
            _remember(history, line)
            text = line.strip()
            if not text:
                continue
            if text == "/exit":
                return 0
            if text == "/reset":
                messages = []
                click.echo("(conversation reset)", err=True)
                continue
            messages.append({"role": "user", "content": line})
            ids = _fit_conversation(gen, messages, runner.params.max_tokens, truncate)
            if ids is None:
                messages.pop()
                continue
            item = PromptItem(prompt=list(messages), line=turn + 1)
            seed = runner.params.seed
            seq = Sample(item, 0, ids, runner.params.seeded(None if seed is None else seed + turn))
            runner.interrupts = 0
            (reply,) = runner.run_batch([seq], labelled=False)
            messages.append({"role": "assistant", "content": reply})
            turn += 1
    finally:
        _save_history(history)


def _fit_conversation(gen: TextGenerator, messages: list[dict], max_tokens: int, truncate: bool) -> list[int] | None:
    """The conversation's ids; the oldest exchanges are dropped when it outgrows the context."""
    while True:
        ids = gen.encode(messages, chat=True)
        try:
            return gen.fit(ids, max_tokens, truncate=truncate)
        except ContextOverflowError as e:
            if len(messages) <= 1:
                click.secho(f"error: {e}", err=True, fg="red")
                return None
            del messages[:2]  # the oldest user/assistant exchange
            click.echo("(dropped the oldest exchange to fit the context)", err=True)


def _setup_readline() -> Path | None:
    try:
        import readline
    except ImportError:  # no readline on this platform: plain input()
        return None
    path = get_settings().history_file
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            readline.read_history_file(path)
    except OSError:
        return None
    readline.set_history_length(1000)
    return path


def _remember(history: Path | None, line: str) -> None:
    """input() records a line typed on a terminal; record piped lines too."""
    if history is not None and line.strip() and not sys.stdin.isatty():
        import readline

        readline.add_history(line)


def _save_history(path: Path | None) -> None:
    if path is None:
        return
    import readline

    try:
        readline.write_history_file(path)
    except OSError:
        pass
