"""`gencli health`: a container's health check (compose.yaml, docker/Dockerfile), usable anywhere."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import click

from gencli.model.errors import GencliError


@click.command()
@click.option("--url", default=None,
              help="The API's base URL: healthy when its /healthz answers 200 (the store and Redis answer).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, show_default=True, help="Seconds to wait.")
def health(url, timeout):
    """Exit 0 when a worker on this host beats in Redis, or with --url, when the API there is healthy."""
    if url:
        target = url.rstrip("/") + "/healthz"
        try:
            with urllib.request.urlopen(target, timeout=timeout) as r:  # noqa: S310 (the user's own URL)
                body = r.read()
        except urllib.error.HTTPError as e:
            raise GencliError(f"{target} answered {e.code}: {e.read().decode(errors='replace')[:200]}") from None
        except (urllib.error.URLError, OSError) as e:
            raise GencliError(f"{target} does not answer: {getattr(e, 'reason', e)}") from None
        click.echo(f"ok: {target} {json.loads(body).get('models', {})}")
        return
    from gencli.worker.client import Client

    host = socket.gethostname()
    here = [w for w in Client().live_workers() if w.get("host") == host]
    if not here:
        raise GencliError(f"no live worker on {host}: none has beaten in Redis lately (gencli status lists them)")
    click.echo("ok: " + ", ".join(f"{w['name']} ({w['device']}, {w['model'] or 'prep'})" for w in here))
