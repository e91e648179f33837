"""`llmtap tunnel`: give a remote machine this machine's llmtap through the system ssh."""

from __future__ import annotations

import signal
import subprocess
import sys
from types import FrameType

import typer
from llmtap import ca, tunnel
from llmtap.cli.options import ConfigOption
from llmtap.config import load_config
from llmtap.errors import UsageError


def tunnel_command(
    destination: str = typer.Argument(..., metavar="[USER@]HOST",
                                      help="The remote machine, as ssh takes it."),
    remote_port: int = typer.Option(8890, "--remote-port", min=1, max=65535,
                                    help="The port on the remote machine's 127.0.0.1."),
    ssh_option: list[str] | None = typer.Option(
        None, "--ssh-option", "-o",
        help="Passed to ssh as -o (repeatable), e.g. -o Port=2222 -o IdentityFile=~/.ssh/build."),
    config: str | None = ConfigOption,
) -> None:
    """Give a remote machine this machine's LLM tap through `ssh -R`: its tools use
    HTTPS_PROXY=http://127.0.0.1:PORT there, reach the LLM APIs through here, and the real keys
    are injected here, never held there. Only TCP is carried (no UDP: no QUIC, no DNS). Needs
    key-based ssh login; reconnects when the link drops; Ctrl-C stops it."""
    settings = load_config(config)
    local = settings.explicit.address
    if local is None:
        raise UsageError('the tunnel needs the explicit proxy: set [explicit] listen = "127.0.0.1:8890" '
                         "in the config and restart llmtap")
    spec = tunnel.TunnelSpec(destination, remote_port, local, tuple(ssh_option or ()))
    tunnel.check_spec(spec)
    runner = tunnel.Tunnel(spec, say)
    ca_path = str(ca.public_cert_path(settings.ca_dir))
    for line in tunnel.exports(spec, ca_path, placeholder_exports(config)):
        typer.echo(line)
    sys.stdout.flush()
    if not tunnel.listening(local):
        say(f"nothing listens on {local[0]}:{local[1]} yet: is `llmtap run` running with this config?")

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        runner.stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, request_stop)
    say(f"connecting to {destination} ...")
    raise typer.Exit(runner.run())


def say(message: str) -> None:
    print(f"llmtap tunnel: {message}", file=sys.stderr, flush=True)


def placeholder_exports(config: str | None) -> list[str]:
    """`llmtap env`'s lines (the placeholders, never a key), when this user may read the store."""
    command = [sys.executable, "-m", "llmtap", "env", "--shell", "sh"]
    if config:
        command += ["--config", config]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if result.returncode != 0:
        return ["# the placeholders for the API keys: see `sudo llmtap env` on this machine"]
    return result.stdout.splitlines()


def register(root: typer.Typer) -> None:
    root.command("tunnel")(tunnel_command)
