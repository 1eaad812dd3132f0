"""Showing several sequences' streamed text on one terminal, in order."""

from __future__ import annotations

import click


class OrderedPrinter:
    """Shows a batch's sequences one after another: the current one live, the rest buffered."""

    def __init__(self, labels: list[str] | None):
        self.labels = labels
        n = len(labels) if labels else 1
        self.buf = [""] * n
        self.done = [False] * n
        self.cur = 0
        self._header(0)

    def _header(self, i: int) -> None:
        if self.labels:
            click.secho(f"=== {self.labels[i]} ===", bold=True)

    def feed(self, i: int, text: str, finished: bool) -> None:
        if i == self.cur:
            click.echo(text, nl=False)
        else:
            self.buf[i] += text
        self.done[i] = self.done[i] or finished
        while self.cur < len(self.done) and self.done[self.cur]:
            click.echo("")
            self.cur += 1
            if self.cur < len(self.done):
                self._header(self.cur)
                click.echo(self.buf[self.cur], nl=False)
