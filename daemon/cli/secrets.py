"""`llmtap secrets set|list|rm` and `llmtap env`: real keys stay with llmtap, tools get placeholders.

Values are read from stdin or a hidden prompt, never from the command line (where `ps`, shell
history and audit logs would keep them). The store belongs to the service user, so these commands
run as root (or as that user) and hand every file they write to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import os
import sys
from typing import Any

import typer
from llmtap import hostpatterns, keybind, provider_keys
from llmtap import secrets_store as store
from llmtap.cli.options import ConfigOption
from llmtap.config import Config, load_config
from llmtap.errors import UsageError
from llmtap.privileges import ServiceUser, ensure_service_user, require_root

with contextlib.suppress(ImportError):  # not on Windows (llmtap.platform.windows.inprocess)
    import pwd

secrets_app = typer.Typer(
    no_args_is_help=True,
    help="Real API keys kept by llmtap; the AI tools only ever hold placeholders.",
)
SHELLS = ("sh", "fish", "powershell")
NO_OWNER = ServiceUser("", -1, -1)  # Windows: the directory's ACL, not an owner, guards the store


def service_owner(settings: Config, create: bool = False) -> ServiceUser:
    if not store.POSIX_OWNERS:  # Windows: no service user; elevated processes own the store
        require_root("llmtap secrets")
        return NO_OWNER
    if create and os.geteuid() == 0:
        return ensure_service_user(settings.service_user)
    try:
        entry = pwd.getpwnam(settings.service_user)
    except KeyError:
        raise UsageError(f"the service user {settings.service_user!r} does not exist: "
                         "run this with sudo (or `sudo llmtap install`) first") from None
    return ServiceUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def require_writer(owner: ServiceUser, action: str) -> None:
    if not store.POSIX_OWNERS:
        require_root(action)  # elevated, on Windows
        return
    if os.geteuid() not in (0, owner.uid):
        raise UsageError(f"{action} needs root: run it with sudo")


def read_value(name: str) -> str:
    """The key, from stdin when it is piped, else from a prompt that does not echo."""
    try:
        if sys.stdin is None or not sys.stdin.isatty():
            value = sys.stdin.read() if sys.stdin else ""
        else:
            value = getpass.getpass(f"Key for {name} (input hidden): ")
    except (EOFError, KeyboardInterrupt):
        raise UsageError("no value given") from None
    value = store.check_value(value)
    return store.check_reference(value) if store.is_reference(value) else value


def open_store(settings: Config) -> tuple[store.StorePaths, ServiceUser | None]:
    """The store's paths, checked for ownership and modes (no owner when there is no store)."""
    paths = store.StorePaths.under(settings.state_dir)
    try:
        if not paths.directory.exists():
            return paths, None
    except PermissionError:  # the state dir belongs to the service user
        raise UsageError(f"cannot read the secret store in {paths.directory}: run it with sudo") from None
    owner = service_owner(settings)
    store.check_permissions(paths, owner.uid, owner.name)
    return paths, owner


# `secrets set`'s options (module-level, as ConfigOption is, so the command reads as its steps).
HostOption = typer.Option(
    None, "--host", help="A host the key may be sent to (repeatable; required for a new secret).")
HeaderOption = typer.Option(
    None, "--header", help=f"Where llmtap adds the key when it adds it: {', '.join(store.HEADERS)} "
    "(default: the provider's usual header).")
WhenAbsentOption = typer.Option(
    None, "--when-absent/--not-when-absent",
    help="Add the key to requests that carry no credential at all (needs --for-user).")
ForUserOption = typer.Option(
    None, "--for-user", help="With --when-absent: a local user whose requests get the key "
    "(repeatable; checked against the process that made the request).")
ReplaceOption = typer.Option(
    False, "--replace", help="Rotate an existing secret's value, keeping its placeholder.")
AllowExeOption = typer.Option(
    None, "--allow-exe", help="Only this executable gets the key (repeatable; its real path: "
    "a symlink or a copy elsewhere is another program).")
AllowScriptOption = typer.Option(
    None, "--allow-script", help="INTERPRETER:SCRIPT: only this interpreter running this "
    "script as its first argument gets the key (repeatable), e.g. "
    "/usr/bin/node:/usr/lib/node_modules/@anthropic-ai/claude-code/cli.js.")
AllowUserOption = typer.Option(
    None, "--allow-user", help="Only processes of this local user get the key (repeatable).")
AllowChildrenOption = typer.Option(
    False, "--allow-children", help="With --allow-exe/--allow-script: a process whose parent "
    "chain holds the allowed program gets the key too (what it runs, it trusts).")
UnbindOption = typer.Option(False, "--unbind", help="With --replace: drop the bindings.")


@secrets_app.command("set")
def set_secret(
    name: str = typer.Argument(..., help="A name of your choice, e.g. anthropic."),
    host: list[str] | None = HostOption,
    header: str | None = HeaderOption,
    when_absent: bool | None = WhenAbsentOption,
    for_user: list[str] | None = ForUserOption,
    replace: bool = ReplaceOption,
    allow_exe: list[str] | None = AllowExeOption,
    allow_script: list[str] | None = AllowScriptOption,
    allow_user: list[str] | None = AllowUserOption,
    allow_children: bool = AllowChildrenOption,
    unbind: bool = UnbindOption,
    config: str | None = ConfigOption,
) -> None:
    """Store a key (read from stdin or a hidden prompt) or a reference env:VAR, file:PATH or
    keyring:SERVICE/USER that the daemon resolves when it starts. Anyone else sending the
    placeholder of a secret bound with --allow-* gets a 403 naming the rule."""
    settings = load_config(config)
    store.check_name(name)
    hosts = store.check_hosts(host or [])
    wanted = _Wanted(hosts, store.check_header(header, hosts) if header else None, when_absent,
                     for_user, _binding(allow_exe, allow_script, allow_user, allow_children, unbind))
    owner = service_owner(settings, create=True)
    require_writer(owner, "llmtap secrets set")
    if when_absent and not replace:  # before asking for the value
        store.check_for_users(for_user or [], True)
    value = read_value(name)
    paths = store.StorePaths.under(settings.state_dir)
    store.ensure_directory(paths, owner.uid, owner.gid)
    with store.locked(paths):
        store.check_permissions(paths, owner.uid, owner.name)
        items = store.read_store(paths)
        previous = _previous(items, name, replace, hosts, value)
        secret = _made(name, value, wanted, store.ensure_key(paths, owner.gid), previous)
        items = [secret if s.name == name else s for s in items] if previous else [*items, secret]
        store.write_store(paths, items, owner.gid)
    _warn_non_targets(settings, secret.hosts)
    _say_stored(secret, rotated=previous is not None)


@dataclasses.dataclass(frozen=True)
class _Wanted:
    """What `secrets set` was told, checked; None or empty: keep the replaced secret's."""

    hosts: tuple[str, ...]
    header: str | None
    when_absent: bool | None
    for_users: list[str] | None
    binding: dict[str, Any] | None


def _previous(items: list[store.Secret], name: str, replace: bool, hosts: tuple[str, ...],
              value: str) -> store.Secret | None:
    """The secret `name` replaces, if any; refuses what `secrets set` may not do."""
    previous = next((s for s in items if s.name == name), None)
    if previous and not replace:
        raise UsageError(f"secret {name!r} already exists: add --replace to rotate its value "
                         "(the placeholder stays the same)")
    if not previous and not hosts:
        raise UsageError("--host is required: name the host(s) this key may be sent to")
    if clash := next((s.name for s in items if s.placeholder == value), None):
        raise UsageError(f"that is the placeholder of secret {clash!r}, not a real key")
    return previous


def _made(name: str, value: str, wanted: _Wanted, key: bytes,
          previous: store.Secret | None) -> store.Secret:
    """The new secret: what was given, else what the replaced one had."""
    absent = bool(wanted.when_absent if wanted.when_absent is not None
                  else previous and previous.when_absent)
    users = wanted.for_users if wanted.for_users is not None else list(
        previous.for_users if previous else ())
    hosts = wanted.hosts or (previous.hosts if previous else ())
    header = wanted.header or (previous.header if previous else store.check_header(None, hosts))
    secret = store.new_secret(name, hosts, header, absent, value, key, previous,
                              store.check_for_users(users, absent))
    if wanted.binding is not None or previous:
        bindings = wanted.binding if wanted.binding is not None else _bound(previous)
        secret = dataclasses.replace(secret, **bindings)
    return secret


def _say_stored(secret: store.Secret, rotated: bool) -> None:
    verb = "rotated" if rotated else "stored"
    typer.echo(f"{verb} secret {secret.name!r} for {', '.join(secret.hosts)} (header {secret.header})")
    if (rule := _rule(secret)) != "anyone":
        typer.echo(f"bound to: {rule}")
    typer.echo(f"placeholder: {secret.placeholder}")
    if rotated:
        typer.echo("the placeholder is unchanged; a running daemon uses the new value from the next request")


def _binding(exes: list[str] | None, scripts: list[str] | None, users: list[str] | None,
             children: bool, unbind: bool) -> dict[str, Any] | None:
    """The bindings given (checked before the value is asked for), or None: keep the old ones."""
    if unbind and (exes or scripts or users or children):
        raise UsageError("--unbind drops the bindings: give it alone, without --allow-*")
    if not (exes or scripts or users or children or unbind):
        return None
    if children and not (exes or scripts):
        raise UsageError("--allow-children goes with --allow-exe or --allow-script")
    if sys.platform != "linux" and not unbind:  # the socket checks (proclookup) are Linux's
        raise UsageError("--allow-* bindings are only available on Linux for now")
    return {"allow_exes": keybind.check_exes(exes or []),
            "allow_scripts": keybind.check_scripts(scripts or []),
            "allow_users": keybind.check_users(users or []) if users else (),
            "allow_children": children}


def _bound(secret: store.Secret | None) -> dict[str, Any]:
    keys = ("allow_exes", "allow_scripts", "allow_users", "allow_children")
    return {k: getattr(secret, k) for k in keys} if secret else {}


def _rule(secret: store.Secret) -> str:
    return keybind.of_secret(secret).rule()


def _warn_non_targets(settings: Config, hosts: tuple[str, ...]) -> None:
    targets = settings.targets.host_set()
    for host in hosts:
        pattern = hostpatterns.parse(host)
        if not targets.covers(pattern):
            print(f"llmtap: warning: {host} is not a target (targets.extra_hosts): llmtap does not see "
                  "its traffic", file=sys.stderr)
        elif settings.redirect.scope == "targets" and not set(pattern.names) <= set(targets.resolvable):
            print(f"llmtap: warning: {host} is only under a wildcard target: list it in "
                  "targets.extra_hosts too, so that the redirect knows its addresses", file=sys.stderr)


@secrets_app.command("list")
def list_secrets(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    config: str | None = ConfigOption,
) -> None:
    """Name, hosts, header, placeholder, created and last used, and the key's last four characters."""
    paths, _ = open_store(load_config(config))
    items = store.read_store(paths)
    rows = [_row(paths, s, store.read_key(paths), store.read_usage(paths)) for s in items]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no secrets (add one: sudo llmtap secrets set NAME --host HOST < keyfile)")
    for row in rows:
        absent = (f" (added when the client sends none, for users: {', '.join(row['for_users'])})"
                  if row["when_absent"] else "")
        typer.echo(f"{row['name']}\n  hosts:       {', '.join(row['hosts'])}\n"
                   f"  header:      {row['header']}{absent}\n  bound to:    {row['bound_to']}\n"
                   f"  placeholder: {row['placeholder']}\n"
                   f"  key:         {row['key']}\n  created:     {row['created_at']}"
                   f"   last used: {row['last_used'] or 'never'}")


def _row(paths: store.StorePaths, secret: store.Secret, key: bytes | None,
         usage: dict[str, str]) -> dict[str, Any]:
    if secret.ref:
        shown = secret.ref
    elif secret.sealed and key:
        shown = "…" + store.unseal(key, secret.id, secret.sealed)[-4:]
    else:
        shown = "(store.key missing)"
    return {"name": secret.name, "hosts": list(secret.hosts), "header": secret.header,
            "when_absent": secret.when_absent, "for_users": list(secret.for_users),
            "placeholder": secret.placeholder, "key": shown, "bound_to": _rule(secret),
            "allow_exes": list(secret.allow_exes), "allow_scripts": [list(p) for p in secret.allow_scripts],
            "allow_users": list(secret.allow_users), "allow_children": secret.allow_children,
            "created_at": secret.created_at, "updated_at": secret.updated_at,
            "last_used": usage.get(secret.id)}


@secrets_app.command("rm")
def remove_secret(
    name: str = typer.Argument(..., help="The secret to remove."),
    config: str | None = ConfigOption,
) -> None:
    """Remove a secret: its placeholder stops working at once."""
    settings = load_config(config)
    paths, owner = open_store(settings)
    if owner is None:
        raise UsageError(f"no secret named {name!r} (see `llmtap secrets list`)")
    require_writer(owner, "llmtap secrets rm")
    with store.locked(paths):
        store.check_permissions(paths, owner.uid, owner.name)
        items = store.read_store(paths)
        if not any(s.name == name for s in items):
            raise UsageError(f"no secret named {name!r} (see `llmtap secrets list`)")
        store.write_store(paths, [s for s in items if s.name != name], owner.gid)
    typer.echo(f"removed secret {name!r}")


def env_command(
    shell: str = typer.Option("sh", "--shell", help=f"Output syntax: {', '.join(SHELLS)}."),
    config: str | None = ConfigOption,
) -> None:
    """Print the placeholder exports for the AI tools, e.g. eval "$(sudo llmtap env)"."""
    if shell not in SHELLS:
        raise UsageError(f"--shell must be one of {', '.join(SHELLS)}, not {shell!r}")
    paths, _ = open_store(load_config(config))
    for line in env_lines(store.read_store(paths), shell):
        typer.echo(line)


def env_lines(items: list[store.Secret], shell: str) -> list[str]:
    exports: dict[str, str] = {}
    lines = []
    for secret in items:
        names = [var for host in secret.hosts for var in provider_keys.env_vars(host)]
        for var in names:
            exports.setdefault(var, secret.placeholder)  # the first secret for a provider wins
        if not names:
            lines.append(f"# secret {secret.name!r} ({', '.join(secret.hosts)}) has no standard "
                         f"variable; its placeholder: {secret.placeholder}")
    syntax = {"sh": "export {}='{}'", "fish": "set -gx {} '{}'", "powershell": "$env:{} = '{}'"}[shell]
    return [syntax.format(var, value) for var, value in exports.items()] + lines


def register(root: typer.Typer) -> None:
    root.add_typer(secrets_app, name="secrets")
    root.command("env")(env_command)
