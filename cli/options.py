"""Option groups shared by the commands (generate now; submit reuses the sampling ones), and
parameter types (list's --since)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import click

from gencli.model.params import DEFAULTS, DTYPES
from gencli.worker.unicode import invalid_at, what_is_wrong


def _apply(options):
    def decorator(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorator


dtype_option = click.option(
    "--dtype",
    envvar="GENCLI_DTYPE",
    type=click.Choice(DTYPES),
    default="auto",
    show_default=True,
    help="Weights: auto (float32 on the CPU, bfloat16 or float16 on a GPU), or int8 on the CPU: "
         "1.6x-2.3x faster, outputs close to float32's (README, Benchmarks).",
)

model_options = _apply(
    [
        click.option(
            "--model",
            "model_path",
            envvar="GENCLI_MODEL",
            required=True,
            help="Checkpoint: a gencli model dir, a nanoGPT ckpt.pt, or a Hugging Face GPT-2 dir.",
        ),
        click.option(
            "--tokenizer",
            default=None,
            help="tiktoken encoding name or .tiktoken file (default: the model's own, else gpt2).",
        ),
        click.option(
            "--chat-format",
            "--chat_format",
            "chat_format",
            type=click.Choice(["chatml", "legacy"]),
            default=None,
            help="Chat format (default: the model's own, else legacy).",
        ),
        click.option(
            "--device",
            envvar="GENCLI_DEVICE",
            default="auto",
            show_default=True,
            help="auto, cpu, cuda, cuda:N or mps.",
        ),
        dtype_option,
    ]
)

sampling_options = _apply(
    [
        click.option("--max_tokens", "--max-tokens", "max_tokens", type=click.IntRange(min=1), default=None,
                     help="New tokens per sample (default: 256, or half the model's context if smaller)."),
        click.option("--temperature", type=click.FloatRange(min=0), default=DEFAULTS["temperature"],
                     show_default=True, help="0 is greedy."),
        click.option("--top_k", "--top-k", "top_k", type=click.IntRange(min=0), default=DEFAULTS["top_k"],
                     show_default=True, help="Sample from the k likeliest ids; 0: no top-k cut."),
        click.option("--top_p", "--top-p", "top_p", type=click.FloatRange(0, 1, min_open=True),
                     default=DEFAULTS["top_p"], show_default=True),
        click.option("--seed", type=int, default=None, help="Seed for reproducible sampling."),
        click.option("--stop", multiple=True, callback=lambda ctx, param, value: _stops(value),
                     help="Stop string (repeatable)."),
        click.option("--truncate", is_flag=True,
                     help="Drop the oldest prompt tokens when prompt + max_tokens exceed the context."),
    ]
)


EXTRA = "gencli.sampling"  # ctx.meta key: the extra sampling keys given on the command line


def _keep(key: str, convert=None):
    """A callback that keeps an option's value as the sampling key `key` (where given)."""
    def callback(ctx, param, value):
        if value is None or value == () or value is False:
            return value
        given = ctx.meta.setdefault(EXTRA, {})
        value = convert(value) if convert else value
        if key == "structured" and "structured" in given:
            raise click.UsageError("give one of --json-schema, --regex, --choice and --grammar")
        given[key] = value
        return value
    return callback


def _logit_bias(values: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for v in values:
        tid, _, bias = v.partition("=")
        try:
            out[tid.strip()] = float(bias)
        except ValueError:
            raise click.BadParameter(f"{v!r}: use ID=BIAS, e.g. 1734=-100") from None
    return out


def _read(path: str, what: str) -> str:
    try:
        return open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None


def _schema(path: str) -> dict:
    import json

    try:
        schema = json.loads(_read(path, "the JSON schema"))
    except ValueError as e:
        raise click.BadParameter(f"{path} is not JSON: {e}") from None
    if not isinstance(schema, dict):
        raise click.BadParameter(f"{path}: a JSON schema is an object")
    return {"json": schema}


def extra_sampling(ctx: click.Context) -> dict:
    """The extra sampling keys given on the command line (penalties, logit_bias, ..., structured)."""
    return dict(ctx.meta.get(EXTRA, {}))


shaping_options = _apply(
    [
        click.option("--presence-penalty", "--presence_penalty", type=float, expose_value=False,
                     callback=_keep("presence_penalty"), help="-2 to 2: lower the logit of every id already made."),
        click.option("--frequency-penalty", "--frequency_penalty", type=float, expose_value=False,
                     callback=_keep("frequency_penalty"), help="-2 to 2: lower it by the times each id was made."),
        click.option("--repetition-penalty", "--repetition_penalty", type=float, expose_value=False,
                     callback=_keep("repetition_penalty"), help="> 0: divide the logits of prompt and output ids."),
        click.option("--logit-bias", "--logit_bias", multiple=True, expose_value=False,
                     callback=_keep("logit_bias", _logit_bias), help="ID=BIAS (-100 to 100), repeatable."),
        click.option("--min-tokens", "--min_tokens", type=int, expose_value=False, callback=_keep("min_tokens"),
                     help="New ids made before an end id or a stop string may end a sample."),
        click.option("--min-p", "--min_p", type=float, expose_value=False, callback=_keep("min_p"),
                     help="Cut ids less likely than min_p times the likeliest."),
        click.option("--stop-token-id", "--stop_token_id", type=int, multiple=True, expose_value=False,
                     callback=_keep("stop_token_ids", list), help="An id that ends a sample (repeatable)."),
        click.option("--ignore-eos", "--ignore_eos", is_flag=True, expose_value=False, callback=_keep("ignore_eos"),
                     help="Run to max_tokens: the end-of-text id neither ends a sample nor is picked."),
        click.option("--json-schema", "--json_schema", metavar="FILE", expose_value=False,
                     callback=_keep("structured", _schema), help="Hold each sample to this JSON schema."),
        click.option("--regex", expose_value=False, callback=_keep("structured", lambda r: {"regex": r}),
                     help="Hold each sample to this regular expression."),
        click.option("--choice", multiple=True, expose_value=False,
                     callback=_keep("structured", lambda c: {"choice": list(c)}),
                     help="Each sample is one of these strings (repeatable)."),
        click.option("--grammar", metavar="FILE", expose_value=False,
                     callback=_keep("structured", lambda f: {"grammar": _read(f, "the grammar")}),
                     help="Hold each sample to this Lark grammar."),
    ]
)


def _stops(value: tuple[str, ...]) -> tuple[str, ...]:
    if any(s == "" for s in value):
        raise click.BadParameter("a stop string cannot be empty (it would end every line at once)")
    for s in value:
        if (at := invalid_at(s)) is not None:  # argv: a byte 0xff arrives as U+DCFF
            raise click.BadParameter(what_is_wrong(s, at))
    return value


class Since(click.ParamType):
    """A point in time to list from: 30m, 2h, 3d or 1w ago (naive UTC, the store's times), or an
    ISO date or date and time (naive, taken as UTC, unless it names its zone)."""

    name = "WHEN"
    forms = "30m, 2h, 3d or 1w ago, or an ISO date or date-time such as 2025-01-31 or 2025-01-31T14:00 (UTC)"
    _seconds = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

    def convert(self, value, param, ctx) -> datetime:
        if isinstance(value, datetime):
            return value
        ago = re.fullmatch(r"(\d+)([mhdw])", value.strip().lower())
        if ago:
            return _utcnow() - timedelta(seconds=int(ago[1]) * self._seconds[ago[2]])
        try:
            return datetime.fromisoformat(value.strip())
        except ValueError:
            self.fail(f"{value!r} is not a time: use {self.forms}", param, ctx)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


SINCE = Since()
