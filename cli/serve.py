"""`gencli serve`: the HTTP API (api/) under uvicorn."""

from __future__ import annotations

import errno
import socket

import click

from gencli.model.errors import GencliError


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0 to serve other machines: then set GENCLI_API_TOKEN).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--token", envvar="GENCLI_API_TOKEN", default=None, show_envvar=True,
              help="Bearer token every route but /healthz needs (default: none).")
@click.option("--max-body", "--max_body", "max_body", type=click.IntRange(min=1), envvar="GENCLI_MAX_BODY",
              default=2 * 1024 * 1024, show_default=True, help="Largest request body in bytes (413 beyond).")
@click.option("--log-level", "--log_level", "log_level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(host, port, token, max_body, log_level):
    """Serve the HTTP API: gencli's jobs, OpenAI's completions, chat and Batch API."""
    import uvicorn

    from gencli.api.app import create_app

    sock = _bind(host, port)
    app = create_app(token=token or None, max_body=max_body)  # GENCLI_API_TOKEN= (empty): no token
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"gencli API on http://{shown}:{sock.getsockname()[1]} (docs at /docs"
               f"{'; bearer token required' if token else ''})", err=True)
    uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)).run(sockets=[sock])


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, or one line saying why not (port taken, address not here)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise GencliError(f"port {port} on {host} is in use: stop what holds it, or pick another with "
                              "--port") from None
        raise GencliError(f"cannot listen on {host}:{port}: {e.strerror or e}: give --host an address of this "
                          "machine") from None
    return sock
