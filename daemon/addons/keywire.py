"""Where keys travel in a request (the auth headers, the `key=` query parameter, bearer tokens),
the names a request goes to, and the credentials stage's per-flow state."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from llmtap.parsers.classify import normalise_host
from mitmproxy import ctx, http

KEY_HEADERS = ("x-api-key", "api-key", "x-goog-api-key")
AUTH_HEADERS = (*KEY_HEADERS, "authorization")


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
