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

import logging
import os
from collections.abc import Awaitable, Sequence
from pathlib import Path

from llmtap import keybind
from llmtap import secret_references as references
from llmtap import secrets_store as store
from llmtap.addons import keygate
from llmtap.addons.echoes import EncodedEchoGuard, StreamScrubber, scrub, scrub_held
from llmtap.addons.keywire import (
    FlowState,
    add_credential,
    ask_identity,
    destinations,
    found_credentials,
    replace_tokens,
    verified_tls_name,
)
from llmtap.addons.replies import refusal
from llmtap.errors import LlmtapError
from llmtap.flow import CREDENTIALS, ProcessLookup, fields
from llmtap.held_keys import Entry, Table, UsageLog
from llmtap.masking import SecretMask
from llmtap.parsers.classify import host_provider, normalise_host
from mitmproxy import ctx, exceptions, http

log = logging.getLogger(__name__)

RETIRED_MAX = 64  # rotated-out keys still scrubbed and flagged (they may still be valid upstream)



class Credentials:
    def __init__(self, attribution: ProcessLookup | None = None) -> None:
        self.attribution = attribution  # who made a request: --for-user, --allow-* need it
        self.gate = keygate.Who(attribution)
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
                value = references.resolve(item.ref)
            elif item.sealed and key:
                value = store.unseal(key, item.id, item.sealed)
            else:
                problem = "its store.key is missing"
        except references.ResolutionError as exc:
            problem = f"cannot resolve {item.ref}: {exc}"
        except LlmtapError as exc:
            problem = str(exc)
        if problem:
            self._report(f"secret {item.name!r}: {problem}")
        if item.when_absent and not item.for_users:
            self._report(f"secret {item.name!r}: --when-absent is not applied without --for-user; "
                         f"set it again with --when-absent --for-user USER")
        return Entry(item.name, item.id, frozenset(item.hosts), item.header, item.when_absent,
                     item.placeholder, value, problem, frozenset(item.for_users), keybind.of_secret(item))

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
        if inject and any(e.binding.bound for e in inject.values()):
            return self._inject_bound(flow, inject)
        if inject:
            self._inject(flow, inject, None)
        elif sent:
            self.key_bearing(flow)
        return None

    async def _inject_for_user(self, flow: http.HTTPFlow, entry: Entry) -> None:
        """--when-absent: only for a request made by one of the secret's users (and programs, if
        it is bound to some), as attribution says; unknown is no."""
        process = await self.gate.process(flow)
        if process is None or process.get("user") not in entry.for_users:
            return
        if entry.binding.bound:
            if entry.binding.check(process) is not None:
                return  # sent on without a key, as for another user
            keygate.decided(flow, entry, "injected")
        self._inject(flow, {}, entry)

    async def _inject_bound(self, flow: http.HTTPFlow, inject: dict[str, Entry]) -> None:
        """A placeholder of a secret bound to programs: its key goes in only for them. Anyone
        else gets a 403 naming the rule, and nothing reaches the upstream."""
        process = await self.gate.process(flow)
        bound = [e for e in {e.id: e for e in inject.values()}.values() if e.binding.bound]
        for entry in bound:
            if why := entry.binding.check(process):
                keygate.refuse(flow, entry, why)
                return
        keygate.decided(flow, bound[0], "injected")
        self._inject(flow, inject, None)

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

    def response_layer(self, flow: http.HTTPFlow) -> StreamScrubber | EncodedEchoGuard | None:
        """A streamed body of a key-bearing flow: echoed keys out, first among the stream layers
        (llmtap.addons.streams), so no later one, nor the client, sees a key."""
        state = flow.metadata.get(CREDENTIALS)
        response = flow.response
        if not state or response is None or not response.stream:
            return None
        if not self.table.pairs or flow.request.method == "HEAD":
            return None
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":  # the upstream ignored ask_identity
            return EncodedEchoGuard(self.table.pairs, encoding, True,
                                    lambda why: self._echo_cut(flow, why))
        if "content-length" in response.headers:  # a placeholder and its key differ in length
            del response.headers["content-length"]
            if flow.client_conn.alpn != b"h2":
                response.headers["transfer-encoding"] = "chunked"
        return StreamScrubber(self.table.pairs, True)

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


def _process(flow: http.HTTPFlow) -> str:
    process = fields(flow).get("process")
    if isinstance(process, dict) and process.get("pid"):
        return f" (pid {process['pid']}, {process.get('name') or 'unknown'})"
    return ""
