"""Which provider and API an intercepted request speaks, from its host, method and path.

A known provider host decides the provider; any other target host (a gateway, a compatible
server in `extra_hosts`) is recognised by the shape of its path. A path that matches nothing
is `api: "unknown"` and is relayed and recorded as such.
"""

from __future__ import annotations

import re

PROVIDER_HOSTS: dict[str, str] = {
    "api.anthropic.com": "anthropic",
    "api.openai.com": "openai",
    "chatgpt.com": "openai",  # Codex signed in with ChatGPT: /backend-api/codex/responses
    "generativelanguage.googleapis.com": "google",
    "aiplatform.googleapis.com": "google",
}

# (provider, method or None for any, path pattern searched at the end of the path, api)
_ROUTES: tuple[tuple[str, str | None, re.Pattern[str], str], ...] = tuple(
    (provider, method, re.compile(pattern + r"$"), api)
    for provider, method, pattern, api in (
        ("anthropic", "POST", r"/v1/messages", "messages"),
        ("anthropic", "POST", r"/v1/messages/count_tokens", "messages.count_tokens"),
        ("anthropic", None, r"/v1/messages/batches/[^/]+/results", "messages.batches.results"),
        ("anthropic", None, r"/v1/messages/batches(/[^/]+(/cancel)?)?", "messages.batches"),
        ("anthropic", "POST", r"/v1/complete", "complete"),
        ("openai", "POST", r"/chat/completions", "chat.completions"),
        ("openai", "POST", r"/responses/input_tokens", "responses.input_tokens"),
        ("openai", None, r"/responses", "responses"),  # GET: the WebSocket upgrade
        ("openai", None, r"/responses/resp_[^/]+", "responses"),
        ("openai", "POST", r"/completions", "completions"),
        ("openai", "POST", r"/embeddings", "embeddings"),
        ("google", "POST", r"/(models|tunedModels)/[^/:]+:generateContent", "generateContent"),
        (
            "google",
            "POST",
            r"/(models|tunedModels)/[^/:]+:streamGenerateContent",
            "streamGenerateContent",
        ),
        ("google", "POST", r"/models/[^/:]+:countTokens", "countTokens"),
        ("google", "POST", r"/models/[^/:]+:(batchEmbedContents|embedContent)", "embedContent"),
        ("anthropic", "GET", r"/v1/models(/[^/]+)?", "models"),
        ("openai", "GET", r"/v1/models(/[^/]+)?", "models"),
        ("google", "GET", r"/v1(beta|alpha)?/models(/[^/:]+)?", "models"),
    )
)


def normalise_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_provider(host: str) -> str | None:
    host = normalise_host(host)
    if host in PROVIDER_HOSTS:
        return PROVIDER_HOSTS[host]
    if host.endswith("-aiplatform.googleapis.com"):  # Vertex AI regional endpoints
        return "google"
    return None


def classify(host: str, method: str, path: str) -> tuple[str, str]:
    """(provider, api); api is "unknown" for a path no parser understands."""
    bare = re.sub(r"/{2,}", "/", path.split("?", 1)[0].split("#", 1)[0]).rstrip("/")
    known = host_provider(host)
    method = method.upper()
    for provider, want_method, pattern, api in _ROUTES:
        if known is not None and provider != known:
            continue
        if known is None and api == "models":
            continue  # a models listing says nothing about which protocol a gateway speaks
        if want_method is not None and method != want_method:
            continue
        if pattern.search(bare):
            return provider, api
    return known or "unknown", "unknown"
