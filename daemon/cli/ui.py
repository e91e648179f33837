"""The views of the calls as they happen: `llmtap ui` (the web UI, served on loopback, its URL
printed with a per-run token) and `llmtap dashboard` (the terminal's)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import sys
import threading
import webbrowser

import typer
from llmtap.cli.history import ReadOnlyOption, open_index
from llmtap.cli.options import ConfigOption
from llmtap.config import Config, load_config
from llmtap.errors import RuntimeFailure, UsageError


def ui_command(
    port: int = typer.Option(0, "--port", help="Listen on this port (default: a free one)."),
    no_open: bool = typer.Option(False, "--no-open", help="Do not open a browser."),
    config: str | None = ConfigOption,
) -> None:
    """A local web UI of the calls: live feed, sessions, conversations, charts, search."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be 0-65535, not {port}")
    settings = load_config(config)
    open_index(settings, read_only=False).close()  # root or the llmtap group, like the records
    token = secrets.token_urlsafe(32)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings, token, port, open_browser=not no_open))


async def serve(settings: Config, token: str, port: int, open_browser: bool) -> None:
    from llmtap.ui.app import App, Guard
    from llmtap.ui.live import LiveFeed
    from llmtap.ui.server import Server
    from llmtap.ui.views import Views

    live = LiveFeed(settings)
    guard = Guard(token, settings.service_user)
    server = Server(App(guard, Views(settings, token, live).routes()), port)
    try:
        guard.port = await server.start()
    except OSError as exc:
        raise RuntimeFailure(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}") from None
    live.start(asyncio.get_running_loop())
    url = f"http://127.0.0.1:{guard.port}/?token={token}"
    typer.echo(f"llmtap ui: {url}\n(Ctrl-C stops it; the token is new each run)")
    sys.stdout.flush()
    if open_browser:
        threading.Thread(target=_open, args=(url,), daemon=True).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        live.stop()
        await server.close()


def _open(url: str) -> None:
    with contextlib.suppress(Exception):
        webbrowser.open(url)


def dashboard(
    read_only: bool = ReadOnlyOption,
    once: bool = typer.Option(False, "--once", help="Print one frame and exit."),
    config: str | None = ConfigOption,
) -> None:
    """Live view: requests in flight, today's tokens and cost against the budget, per process."""
    from llmtap import dashboard as view

    settings = load_config(config)
    view.run(settings, read_only=read_only, once=once)


def register(root: typer.Typer) -> None:
    root.command("ui")(ui_command)
    root.command("dashboard")(dashboard)
