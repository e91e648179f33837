"""What the upstream pool reads of mitmproxy's HTTP layers: whether a server connection sits
between two exchanges (so that another client may have it), and which clients cannot be served
over a pooled HTTP/1.1 connection (llmtap.upstream_pool)."""

from __future__ import annotations

from mitmproxy import connection, ctx, http
from mitmproxy.net.http import http1
from mitmproxy.proxy import context
from mitmproxy.proxy.layers.http import HttpLayer
from mitmproxy.proxy.layers.http._http1 import Http1Client


def needs_h2_upstream(client: connection.Client) -> bool:
    """The client offers HTTP/2 and not HTTP/1.1 (gRPC does): it is given its server's HTTP/2,
    never a pooled connection. Every other client's upstream connections speak HTTP/1.1."""
    offers = client.alpn_offers
    return bool(ctx.options.http2) and b"h2" in offers and b"http/1.1" not in offers


def http1_client(conn_context: context.Context, conn: connection.Server) -> Http1Client | None:
    """The HTTP/1 client layer speaking on `conn`: under the HTTP layer's entry for it (directly,
    or below the TLS layer of a connection it opened itself)."""
    http = next((x for x in reversed(conn_context.layers) if isinstance(x, HttpLayer)), None)
    layer: object = http.connections.get(conn) if http else None
    while layer is not None and not isinstance(layer, Http1Client):
        layer = getattr(layer, "child_layer", None)
    return layer


def http1_idle(layer: Http1Client | None) -> bool:
    """The connection's HTTP/1 client layer sits between two exchanges with nothing buffered,
    or has just ended the one exchange mitmproxy gives it for an HTTP/2 client."""
    if layer is None or layer.buf:
        return False
    if layer.request_done and layer.response_done:  # mark_done is closing it (or has)
        return finished_for_h2(layer)
    return (layer.stream_id is None and layer.request is None and layer.response is None
            and layer.state == layer.read_headers)


def finished_for_h2(layer: Http1Client) -> bool:
    """mitmproxy closes an HTTP/1.1 connection after one request of an HTTP/2 client, whatever
    the headers say (mitmproxy.proxy.layers.http._http1, mark_done); this one ended its exchange
    whole, and nothing else would close it: its response had a length and did not say close."""
    request, response = layer.request, layer.response
    if not (request and response and request.is_http2 and framed(request)):
        return False
    if response.status_code < 200:  # a 100 or 103 taken for the response: the real one is to come
        return False
    try:
        read_to_eof = http1.expected_http_body_size(request, response) == -1
    except ValueError:
        return False
    return not read_to_eof and not http1.connection_close(response.http_version, response.headers)


def framed(request: http.Request) -> bool:
    """An HTTP/2 request went out over HTTP/1.1 with its body's exact length (or no body): had
    the upstream read any of its bytes as another request, a pooled connection would carry that
    request's rest to another client (request smuggling). A streamed body is never counted sound."""
    body = request.raw_content
    if body is None or request.trailers or "transfer-encoding" in request.headers:
        return False
    declared = request.headers.get("content-length")
    return declared == str(len(body)) if declared is not None else not body


def frame_for_http1(request: http.Request, body_known: bool) -> None:
    """HTTP/2 frames a body itself; over HTTP/1.1 a body needs its length or chunks, or the
    upstream takes it for the next request. mitmproxy sends an HTTP/2 request's headers as they
    are. At the headers (`body_known` False) a request stating no length is marked chunked,
    whatever its method (a GET can carry a body too), which mitmproxy then applies to a body it
    streams; once the whole body is known, chunks give way to its exact length (none for an
    empty body). Trailers cannot follow over HTTP/1.1 here: mitmproxy's HTTP/1.1 client has no
    way to send them, and fails on them."""
    headers = request.headers
    if not body_known:
        if "content-length" not in headers:
            headers["transfer-encoding"] = "chunked"
        return
    body = request.raw_content or b""
    if headers.get("transfer-encoding") == "chunked":
        del headers["transfer-encoding"]
        if body:
            headers["content-length"] = str(len(body))
    elif body and "content-length" not in headers:
        headers["content-length"] = str(len(body))
    request.trailers = None
