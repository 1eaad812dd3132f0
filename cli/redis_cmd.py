"""`gencli redis`: the private redis-server gencli starts when no Redis answers."""

from __future__ import annotations

import click

from gencli.storage.settings import get_settings


@click.group("redis")
def redis_group():
    """The private Redis gencli starts when none answers: status, stop."""


@redis_group.command()
def status():
    """Which Redis gencli uses, and whether it answers (exit status 1 when none answers)."""
    from gencli.worker.redis_boot import ping, private_status, shown_url

    s = get_settings()
    if s.redis_url_given:
        answers = ping(s.redis_url)
        click.echo(f"GENCLI_REDIS_URL {shown_url(s.redis_url)}: {'answers' if answers else 'does not answer'}")
        if not answers:
            raise SystemExit(1)
        return
    default = ping(s.redis_url)
    click.echo(f"default {s.redis_url}: {'answers (used)' if default else 'does not answer'}")
    private = private_status(s.home)
    if private is None:
        click.echo(f"private: none started under {s.home / 'redis'}")
    else:
        url, answers = private
        click.echo(f"private {url}: {'answers' if answers else 'not running'}"
                   f"{' (used)' if answers and not default else ''}")
    if not default and not (private and private[1]):
        raise SystemExit(1)


@redis_group.command()
def stop():
    """Stop the private redis-server gencli started (jobs queued in it are kept in the store, and
    sent again by a worker once a Redis answers)."""
    from gencli.worker.redis_boot import stop_private

    home = get_settings().home
    url = stop_private(home)
    click.echo(f"stopped the private Redis at {url}" if url else f"no private Redis is running under {home / 'redis'}")
