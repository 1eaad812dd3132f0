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
        self.shown = [False] * n  # some of its text is on the screen
        self.cur = 0
        self._header(0)

    def _header(self, i: int) -> None:
        if self.labels:
            click.secho(f"=== {self.labels[i]} ===", bold=True)

    def feed(self, i: int, text: str, finished: bool) -> None:
        self.shown[i] = self.shown[i] or bool(text)
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

    def restart(self, i: int, text: str, finished: bool, note: str | None) -> None:
        """Sequence i starts over with text (a retry, a resume from the store): the note goes to
        stderr and the new text is shown whole, after what was shown of the old one."""
        if i > self.cur or (i == self.cur and not self.shown[i]):  # nothing of it on screen: just show it
            if i > self.cur:
                self.buf[i] = ""
            self.done[i] = False
            self.feed(i, text, finished)
            return
        label = self.labels[i] if self.labels else "output"
        click.echo("")
        click.secho(f"[{label}: {note or 'restarted'}; its text from the start:]", err=True, fg="yellow")
        if i < self.cur:  # finished and shown already: show it again, whole, then carry on
            self._header(i)
            click.echo(text)
            if self.cur < len(self.done):  # the live one goes on under its header
                self._header(self.cur)
            return
        self.done[i] = False
        self.feed(i, text, finished)
