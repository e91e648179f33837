"""The `llmtap` command line: one module per command group, each with `register(root)`.

Every error a user can cause is one line and an exit code (main). Adding a group is one line in
GROUPS.
"""

from __future__ import annotations

import sys

import typer
from llmtap import __version__
from llmtap.cli import budget, ca, daemon, history, install, prices, rules, secrets, tunnel, ui
from llmtap.errors import LlmtapError

GROUPS = (
    daemon,  # run, status, cleanup
    install,  # install, uninstall, doctor
    ca,  # ca path, ca rotate
    secrets,  # secrets set|list|rm, env
    rules,
    prices,
    budget,  # budget set|list|rm, limit set|list|rm
    history,  # logs, show, stats, export, reindex
    ui,  # ui, dashboard
    tunnel,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="See, secure and account for every LLM API call on this machine.",
)
for group in GROUPS:
    group.register(app)


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


def main(argv: list[str] | None = None) -> int:
    """Click reports usage errors itself (exit 2); ours are one line with their exit code."""
    try:
        app(args=argv)
    except LlmtapError as exc:
        print(f"llmtap: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
