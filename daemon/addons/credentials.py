"""Credential injection: the AI tools hold placeholders; the real key is added on the way out.

A registered placeholder in `x-api-key`, `Authorization: Bearer`, `api-key` (Azure OpenAI),
`x-goog-api-key` or the `key=` query parameter is replaced by its real key, but only toward the
hosts its secret is bound to (names, or patterns such as `*.openai.azure.com`, llmtap.hostpatterns);
toward any other host the request is answered with a provider-shaped 403 instead. Real keys a
client sends itself are flagged (something on the machine holds one), real keys an upstream
echoes back become placeholders again, and once a request has gone out its credentials are put
back as the client sent them, so nothing that logs the flow later ever sees a real key.

The store is re-read when its file changes (one stat per request), so a rotated key is used from
the next request on; open streams keep going untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from llmtap import hostpatterns
from llmtap import secrets_store as store
from llmtap.addons.echoes import EncodedEchoGuard, StreamScrubber, scrub, scrub_held
from llmtap.addons.replies import refusal
from llmtap.errors import LlmtapError
from llmtap.flow import CREDENTIALS, ProcessLookup, fields
from llmtap.hostpatterns import HostSet
from llmtap.masking import NO_MASK, SecretMask
from llmtap.parsers.classify import host_provider, normalise_host
from mitmproxy import ctx, exceptions, http

log = logging.getLogger(__name__)

KEY_HEADERS = ("x-api-key", "api-key", "x-goog-api-key")
AUTH_HEADERS = (*KEY_HEADERS, "authorization")
RETIRED_MAX = 64  # rotated-out keys still scrubbed and flagged (they may still be valid upstream)
USAGE_FLUSH_S = 5.0
USER_WAIT_S = 2.0  # how long --when-absent waits to learn which user made a request

@dataclass(frozen=True)
class Entry:
    """One secret as the worker uses it."""

    name: str
    id: str
    hosts: frozenset[str]
    header: str
    when_absent: bool
    placeholder: str
    value: str | None  # None: its reference could not be resolved
    problem: str = ""
    for_users: frozenset[str] = frozenset()  # when_absent: only for requests these users made

    @functools.cached_property
    def bound(self) -> HostSet:
        """The hosts as patterns (a name, or `*.openai.azure.com`: one label under it)."""
        return hostpatterns.host_set(tuple(sorted(self.hosts)))

    def allows(self, hosts: set[str]) -> bool:
        """Every name the request goes to (Host and SNI) is one the secret is bound to."""
        return all(self.bound.matches(h) for h in hosts)


@dataclass(frozen=True)
class Table:
    by_placeholder: dict[str, Entry] = field(default_factory=dict)
    by_value: dict[str, Entry] = field(default_factory=dict)  # current and retired keys
    absent: tuple[Entry, ...] = ()  # secrets added when none is sent, first created first
    pairs: tuple[tuple[bytes, bytes], ...] = ()  # (real key, placeholder) for scrubbing
    mask: SecretMask = NO_MASK  # every held value, for whatever llmtap writes or shows

    @classmethod
    def build(cls, entries: list[Entry], retired: dict[str, Entry]) -> Table:
        current = {e.value: e for e in entries if e.value}
        by_value = {**retired, **current}
        # never for anyone: a when_absent secret names its users
        absent = tuple(e for e in entries if e.when_absent and e.value and e.for_users)
        return cls(
            by_placeholder={e.placeholder: e for e in entries},
            by_value=by_value,
            absent=absent,
            pairs=tuple((v.encode(), e.placeholder.encode()) for v, e in by_value.items()),
            mask=SecretMask(by_value),
        )


@dataclass
class FlowState:
    """Set on a flow that carried a registered real key (injected, or sent by the client)."""

    path: str | None = None  # the client's own path, when llmtap changed its query
    added: str | None = None  # the header llmtap added to a request that had none
    restored: bool = False
    asked_identity: bool = False  # accept-encoding was set to identity (see ask_identity)
    accept_encoding: str | None = None  # the client's own, put back once the request has left


def ask_identity(request: http.Request, state: FlowState) -> None:
    """A key-bearing request asks its upstream for an uncompressed response, so that an echo of
    the key can be scrubbed as the bytes pass (EncodedEchoGuard covers an upstream that ignores
    this). The client's own accept-encoding is put back in the flow once the request has left."""
    if not state.asked_identity:
        state.asked_identity = True
        state.accept_encoding = request.headers.get("accept-encoding")
        request.headers["accept-encoding"] = "identity"


# --- where credentials are in a request ---


def query_keys(path: str) -> list[str]:
    _, sep, query = path.partition("?")
    if not sep:
        return []
    return [unquote(v) for k, eq, v in (i.partition("=") for i in query.split("&")) if k == "key" and eq]


def map_query_key(path: str, mapping: dict[str, str]) -> str:
    base, sep, query = path.partition("?")
    if not sep:
        return path
    items = []
    for item in query.split("&"):
        name, eq, value = item.partition("=")
        if name == "key" and eq and unquote(value) in mapping:
            item = f"key={mapping[unquote(value)]}"
        items.append(item)
    return f"{base}?{'&'.join(items)}"


def bearer_token(value: str) -> str:
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else value.strip()


_AUTH_NAMES = {n.encode(): n for n in AUTH_HEADERS}


def found_credentials(request: http.Request) -> list[tuple[str, str]]:
    """(where, token) for every credential the client put where providers look for one."""
    found = []
    for raw_name, raw_value in request.headers.fields:  # one pass: this runs on every request
        name = _AUTH_NAMES.get(raw_name.lower())
        if name:
            value = raw_value.decode("utf-8", "surrogateescape")  # as mitmproxy decodes them
            found.append((name, bearer_token(value) if name == "authorization" else value.strip()))
    if "?" in request.path:
        found += [("query:key", v) for v in query_keys(request.path)]
    return found


def replace_tokens(request: http.Request, mapping: dict[str, str]) -> None:
    """Replaces each token that is exactly a key of `mapping`, in place, wherever it is."""
    changed, fields = False, []
    for raw_name, raw_value in request.headers.fields:
        name = _AUTH_NAMES.get(raw_name.lower())
        if name:
            value = raw_value.decode("utf-8", "surrogateescape")
            new = _rebearer(value, mapping) if name == "authorization" else mapping.get(value.strip(), value)
            if new != value:
                raw_value, changed = new.encode("utf-8", "surrogateescape"), True
        fields.append((raw_name, raw_value))
    if changed:
        request.headers.fields = tuple(fields)
    if "?" in request.path:
        request.path = map_query_key(request.path, mapping)


def _rebearer(value: str, mapping: dict[str, str]) -> str:
    token = bearer_token(value)
    if token not in mapping:
        return value
    if token == value.strip():  # a bare token, no scheme
        return mapping[token]
    return f"{value.strip().partition(' ')[0]} {mapping[token]}"


def add_credential(request: http.Request, header: str, value: str) -> None:
    if header == "query:key":
        request.path += f"{'&' if '?' in request.path else '?'}key={value}"
    elif header == "authorization":
        request.headers["authorization"] = f"Bearer {value}"
    else:
        request.headers[header] = value


def wire_name(name: str) -> str:
    """A Host or server name as checked: one not in ASCII, or with spaces, stays as it is and
    matches no binding (lower() would turn the Kelvin sign into a "k"; real names travel as
    IDNA xn-- labels)."""
    return normalise_host(name) if name.isascii() and name == name.strip() else name


def destinations(flow: http.HTTPFlow) -> set[str]:
    """Where the request really goes: its Host/authority and the TLS server name, both checked."""
    hosts = {wire_name(flow.request.pretty_host)}
    if flow.client_conn.sni:
        hosts.add(wire_name(flow.client_conn.sni))
    return hosts


def verified_tls_name(flow: http.HTTPFlow) -> str | None:
    """The name the upstream certificate of this request's connection is verified for, or None
    when the request does not travel over TLS on both legs.

    mitmproxy picks the request's server connection by (host, port, TLS) once the request hooks
    have run: the context's own connection when those match it, whose SNI is the client's (or
    one already set), else a new one whose SNI is the request's host. Upstream certificates are
    always verified against that SNI (ssl_insecure is never set; checked here all the same).
    """
    request, server = flow.request, flow.server_conn
    if request.scheme != "https" or not flow.client_conn.tls or ctx.options.ssl_insecure:
        return None
    if server.address is not None and tuple(server.address[:2]) == (request.host, request.port):
        name = server.sni or flow.client_conn.sni
    else:
        name = request.host
    return wire_name(name) if name else None


# --- last-used times ---


class UsageLog:
    """Last-used times, in a file of the worker's own (it cannot write the root-managed store).

    A secret's first use is written at once; later ones at most every USAGE_FLUSH_S seconds.
    """

    def __init__(self, paths: store.StorePaths) -> None:
        self.paths = paths
        self.stamps = store.read_usage(paths)
        self.written: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None

    def touch(self, secret_id: str) -> None:
        self.stamps[secret_id] = store.now()
        if secret_id not in self.written:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(USAGE_FLUSH_S, self.flush)
            except RuntimeError:  # no event loop (tests): write now
                self.flush()

    def flush(self) -> None:
        self._timer = None
        data = json.dumps(self.stamps, indent=2).encode() + b"\n"
        try:
            # Not synced: a last-used time lost in a crash is not worth a disk flush on the loop.
            # The daemon's own file: -1 keeps the owner it creates it with, on any platform.
            store.write_private(self.paths.usage, data, -1, -1, durable=False)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.paths.usage, exc.strerror)
        self.written.update(self.stamps)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self.flush()


# --- the addon ---


class Credentials:
    def __init__(self, attribution: ProcessLookup | None = None) -> None:
        self.attribution = attribution  # who made a request: --when-absent --for-user needs it
        self.paths: store.StorePaths | None = None
        self.table = Table()
        self.usage: UsageLog | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._store_file = ""
        self._retired: dict[str, Entry] = {}
        self._reported: set[str] = set()
        self.key_ports: frozenset[int] = frozenset({443})

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option("llmtap_state_dir", str, "", "llmtap's state directory.")
        loader.add_option("llmtap_key_ports", Sequence[str], ["443"],
                          "The only upstream ports real keys are added toward (the redirected ones).")

    def configure(self, updated: set[str]) -> None:
        if "llmtap_key_ports" in updated:
            try:
                self.key_ports = frozenset(int(p) for p in ctx.options.llmtap_key_ports)
            except ValueError:
                raise exceptions.OptionsError("llmtap_key_ports: not a list of port numbers") from None
        if "llmtap_state_dir" not in updated:
            return
        state_dir = ctx.options.llmtap_state_dir
        self.paths = store.StorePaths.under(Path(state_dir)) if state_dir else None
        self._store_file = str(self.paths.store) if self.paths else ""
        self.usage = UsageLog(self.paths) if self.paths else None
        self._stamp = None
        self.table = Table()
        self.refresh()

    def running(self) -> None:
        for handler in logging.getLogger().handlers:  # mitmproxy's log lines and ours alike
            if self._log_filter not in handler.filters:
                handler.addFilter(self._log_filter)

    def mask(self) -> SecretMask:
        """The held values, current and rotated-out, to mask by (it changes with the store)."""
        return self.table.mask

    def _log_filter(self, record: logging.LogRecord) -> bool:
        """No log line carries a held value, whoever wrote it (a URL, a header in an error)."""
        mask = self.table.mask
        if mask:
            message = record.getMessage()
            masked = mask.text(message)
            if masked != message:
                record.msg, record.args = masked, None
        return True

    # -- the store --

    def refresh(self) -> None:
        """Re-reads the store when its file changed (inode, mtime or size): one stat per call."""
        if self.paths is None:
            return
        try:
            info = os.stat(self._store_file)
            stamp: tuple[int, int, int] | None = (info.st_ino, info.st_mtime_ns, info.st_size)
        except OSError:
            stamp = None
        if stamp != self._stamp:
            self._stamp = stamp
            self._reload()

    def _reload(self) -> None:
        assert self.paths is not None
        try:
            store.check_own_store(self.paths)
            items = store.read_store(self.paths)
            key = store.read_key(self.paths) if any(i.sealed for i in items) else None
        except LlmtapError as exc:  # keep the secrets in force; say why once
            self._report(f"secret store not reloaded: {exc}")
            return
        entries = [self._entry(item, key) for item in items]
        new_values = {e.value for e in entries}
        for old in self.table.by_value.values():
            if old.value and old.value not in new_values:
                self._retired[old.value] = old
        while len(self._retired) > RETIRED_MAX:
            self._retired.pop(next(iter(self._retired)))
        self.table = Table.build(entries, self._retired)

    def _entry(self, item: store.Secret, key: bytes | None) -> Entry:
        value, problem = None, ""
        try:
            if item.ref:
                value = store.resolve(item.ref)
            elif item.sealed and key:
                value = store.unseal(key, item.id, item.sealed)
            else:
                problem = "its store.key is missing"
        except store.ResolutionError as exc:
            problem = f"cannot resolve {item.ref}: {exc}"
        except LlmtapError as exc:
            problem = str(exc)
        if problem:
            self._report(f"secret {item.name!r}: {problem}")
        if item.when_absent and not item.for_users:
            self._report(f"secret {item.name!r}: --when-absent is not applied without --for-user; "
                         f"set it again with --when-absent --for-user USER")
        return Entry(item.name, item.id, frozenset(item.hosts), item.header, item.when_absent,
                     item.placeholder, value, problem, frozenset(item.for_users))

    def _report(self, message: str) -> None:
        # A warning: mitmproxy's startup check stops the proxy at any error logged while it
        # starts, and one broken secret must not take every other call down with it.
        if message not in self._reported:
            self._reported.add(message)
            log.warning("%s", message)

    # -- requests --

    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        self.refresh()
        if not self.table.by_placeholder and not self.table.by_value:
            return None
        hosts = destinations(flow)
        found = found_credentials(flow.request)
        inject: dict[str, Entry] = {}
        sent = False
        for where, token in found:
            if entry := self.table.by_placeholder.get(token):
                if why := self._refusal(flow, entry, hosts):
                    self._block(flow, entry, hosts, why)
                    return None
                inject[token] = entry
            elif entry := self.table.by_value.get(token):
                self._flag(flow, entry, hosts, where)
                if why := self._refusal(flow, entry, hosts):  # it must not leave unprotected either
                    self._block(flow, entry, hosts, "real key" if why == "unbound" else why)
                    return None
                sent = True
        absent = None if found else self._absent(flow, hosts)
        if absent and not inject:
            return self._inject_for_user(flow, absent)
        if inject:
            self._inject(flow, inject, None)
        elif sent:
            self.key_bearing(flow)
        return None

    async def _inject_for_user(self, flow: http.HTTPFlow, entry: Entry) -> None:
        """--when-absent: only for a request made by one of the secret's users, as attribution
        says (waiting a little for its answer); unknown is no."""
        process = self.attribution.process_of(flow) if self.attribution else None
        pending = self.attribution.pending(flow) if self.attribution and process is None else None
        if pending is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                process = await asyncio.wait_for(asyncio.shield(pending), USER_WAIT_S)
        user = process.get("user") if isinstance(process, dict) else None
        if user in entry.for_users:
            self._inject(flow, {}, entry)

    def _refusal(self, flow: http.HTTPFlow, entry: Entry, hosts: set[str]) -> str | None:
        """Why the real key of `entry` must not be added to this request, or None.

        The one rule: only on a request bound for a host the secret is bound to (Host and SNI),
        over TLS on both legs, to a redirected port, on an upstream connection whose certificate
        is verified for one of the secret's hosts.
        """
        if not entry.allows(hosts):
            return "unbound"
        if flow.request.scheme != "https" or not flow.client_conn.tls:
            return "plain http"
        if flow.request.port not in self.key_ports:
            return "port"
        name = verified_tls_name(flow)
        if name is None or not entry.bound.matches(name):
            return "unverified"
        if entry.value is None:
            return "unresolved"
        return None

    def _absent(self, flow: http.HTTPFlow, hosts: set[str]) -> Entry | None:
        """The secret to add to a request that carries no credential, if one is set up for it."""
        entry = next((e for e in self.table.absent if any(e.bound.matches(h) for h in hosts)), None)
        return entry if entry and self._refusal(flow, entry, hosts) is None else None

    def _inject(self, flow: http.HTTPFlow, inject: dict[str, Entry], absent: Entry | None) -> None:
        request = flow.request
        state = FlowState(path=request.path)
        replace_tokens(request, {token: e.value for token, e in inject.items() if e.value})
        if absent and absent.value:
            add_credential(request, absent.header, absent.value)
            state.added = None if absent.header == "query:key" else absent.header
        if state.path == request.path:
            state.path = None
        flow.metadata[CREDENTIALS] = state
        ask_identity(request, state)
        used = [*inject.values(), *([absent] if absent else [])]
        fields(flow)["credential"] = used[0].name
        if self.usage:
            for entry in {e.id: e for e in used}.values():
                self.usage.touch(entry.id)

    def _block(self, flow: http.HTTPFlow, entry: Entry, hosts: set[str], why: str) -> None:
        host = normalise_host(flow.request.pretty_host)
        wrong = ", ".join(sorted(h for h in hosts if not entry.bound.matches(h))) or host
        allowed = ", ".join(sorted(entry.hosts))
        message = {
            "unbound": f"llmtap blocked this request: the placeholder of secret {entry.name!r} may "
                       f"only be sent to {allowed}, not {wrong}",
            "plain http": f"llmtap blocked this request: secret {entry.name!r} is only added over "
                          f"HTTPS, and this request is plain HTTP",
            "port": f"llmtap blocked this request: secret {entry.name!r} is only added on the "
                    f"redirected ports ({', '.join(map(str, sorted(self.key_ports)))}), not "
                    f"{flow.request.port}",
            "unverified": f"llmtap blocked this request: secret {entry.name!r} is only added on a "
                          f"TLS connection verified for {allowed}",
            "unresolved": f"llmtap blocked this request: secret {entry.name!r} has no value "
                          f"({entry.problem})",
            "real key": f"llmtap blocked this request: the real key of secret {entry.name!r} may "
                        f"only be sent to {allowed}, not {wrong}",
        }[why]
        flow.request.stream = False  # a response and a streamed request cannot go together
        flow.response = refusal(host_provider(host), 403, message, "llmtap_credential_blocked",
                                "credentials")
        record = fields(flow)
        record["credential"] = entry.name
        record["error"] = message
        log.warning("%s%s", message.removeprefix("llmtap "), _process(flow))

    def _flag(self, flow: http.HTTPFlow, entry: Entry, hosts: set[str], where: str) -> None:
        fields(flow).setdefault("credential_alerts", []).append(
            {"secret": entry.name, "where": where, "alert": "real key sent by the client"})
        log.warning("a client sent the real key of secret %r (in %s) to %s%s: something on this "
                    "machine holds it", entry.name, where, ", ".join(sorted(hosts)), _process(flow))

    def key_bearing(self, flow: http.HTTPFlow) -> None:
        """A real key left in this request (the DLP stage let one in its body through): any echo
        of it in the response is scrubbed."""
        ask_identity(flow.request, flow.metadata.setdefault(CREDENTIALS, FlowState()))

    # -- responses --

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._restore(flow)
        response = flow.response
        if response is None or not self.table.pairs:
            return
        if any(v in value for _, value in response.headers.fields for v, _ in self.table.pairs):
            response.headers.fields = tuple(
                (name, scrub(value, self.table.pairs)) for name, value in response.headers.fields)

    def response(self, flow: http.HTTPFlow) -> None:
        state = flow.metadata.get(CREDENTIALS)
        response = flow.response
        if state and response is not None and response.raw_content is not None and self.table.pairs:
            scrub_held(flow, self.table.pairs)

    def error(self, flow: http.HTTPFlow) -> None:
        self._restore(flow)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        assert flow.websocket is not None
        message = flow.websocket.messages[-1]
        if message.from_client:
            for value, entry in self.table.by_value.items():
                if value.encode() in message.content:
                    self._flag(flow, entry, destinations(flow), "a WebSocket message")
                    flow.metadata.setdefault(CREDENTIALS, FlowState())
            return
        state = flow.metadata.get(CREDENTIALS)
        if state:
            message.content = scrub(message.content, self.table.pairs)

    def wrap_stream(self, flow: http.HTTPFlow) -> None:
        """Called last of all responseheaders hooks: scrubs a streamed body of a key-bearing flow."""
        state = flow.metadata.get(CREDENTIALS)
        response = flow.response
        if not state or response is None or not response.stream:
            return
        if not self.table.pairs or flow.request.method == "HEAD":
            return
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":  # the upstream ignored ask_identity
            response.stream = EncodedEchoGuard(self.table.pairs, encoding, response.stream,
                                               lambda why: self._echo_cut(flow, why))
            return
        response.stream = StreamScrubber(self.table.pairs, response.stream)
        if "content-length" in response.headers:  # a placeholder and its key differ in length
            del response.headers["content-length"]
            if flow.client_conn.alpn != b"h2":
                response.headers["transfer-encoding"] = "chunked"

    def _echo_cut(self, flow: http.HTTPFlow, why: str) -> None:
        fields(flow).setdefault("credential_alerts", []).append(
            {"alert": f"{why} in a compressed stream: the stream was cut"})
        log.warning("%s: %s in a %s-encoded stream: cut before it reached the client%s",
                    flow.request.pretty_host, why,
                    flow.response.headers.get("content-encoding") if flow.response else "?",
                    _process(flow))

    def _restore(self, flow: http.HTTPFlow) -> None:
        """The request has gone out: from now on the flow shows no real key to whoever logs it.

        What llmtap changed goes back to what the client sent; a real key the client sent itself
        is shown as its placeholder.
        """
        state = flow.metadata.get(CREDENTIALS)
        if not state or state.restored:
            return
        state.restored = True
        if state.path is not None:
            flow.request.path = state.path
        if state.added:
            del flow.request.headers[state.added]
        if state.asked_identity:
            if state.accept_encoding is None:
                del flow.request.headers["accept-encoding"]
            else:
                flow.request.headers["accept-encoding"] = state.accept_encoding
        replace_tokens(flow.request, {v: e.placeholder for v, e in self.table.by_value.items()})

    def done(self) -> None:
        if self.usage:
            self.usage.close()
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self._log_filter)


class CredentialStreams:
    """A stream tail of the pipeline (behind every stage that chooses whether and how a response
    streams: protocols, recorder): wraps the stream they settled on with the key scrubber."""

    def __init__(self, owner: Credentials) -> None:
        self.owner = owner

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self.owner.wrap_stream(flow)


def _process(flow: http.HTTPFlow) -> str:
    process = fields(flow).get("process")
    if isinstance(process, dict) and process.get("pid"):
        return f" (pid {process['pid']}, {process.get('name') or 'unknown'})"
    return ""
