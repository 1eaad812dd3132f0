"""`gencli redis`: the private redis-server gencli starts when no Redis answers."""

from __future__ import annotations

import click

from gencli.storage.settings import get_settings


@click.group("redis")
def redis_group():
    """The private Redis gencli starts when none answers: status, stop."""


@redis_group.command()
def status():
    """Which Redis gencli uses, and whether it answers."""
    from gencli.worker.redis_boot import ping, private_status

    s = get_settings()
    if s.redis_url_given:
        click.echo(f"GENCLI_REDIS_URL {s.redis_url}: {'answers' if ping(s.redis_url) else 'does not answer'}")
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


@redis_group.command()
def stop():
    """Stop the private redis-server gencli started (jobs queued in it are kept in the store, and
    sent again by a worker once a Redis answers)."""
    from gencli.worker.redis_boot import stop_private

    home = get_settings().home
    url = stop_private(home)
    click.echo(f"stopped the private Redis at {url}" if url else f"no private Redis is running under {home / 'redis'}")
