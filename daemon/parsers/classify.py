"""Which provider and API an intercepted request speaks, from its host, method and path.

Two independent questions. The HOST decides `provider`: the party that bills the call (its id is
what pricing and the records use). The PATH decides `api`, the wire shape, on any host: Gemini's
`/v1beta/openai/chat/completions`, Anthropic's `/v1/chat/completions`, Groq's
`/openai/v1/chat/completions` and OpenRouter's `/api/v1/chat/completions` are all Chat Completions,
so the Chat Completions parser reads them while the host's provider is recorded. A host that is not
a known provider (a gateway, a compatible server in `extra_hosts`) is recorded under the family of
the wire shape it speaks. A path that matches nothing is `api: "unknown"` and is relayed and
recorded as such.
"""

from __future__ import annotations

import re

from llmtap.parsers import azure

PROVIDER_HOSTS: dict[str, str] = {
    "api.anthropic.com": "anthropic",
    "api.openai.com": "openai",
    "chatgpt.com": "openai",  # Codex signed in with ChatGPT: /backend-api/codex/responses
    "generativelanguage.googleapis.com": "google",
    "aiplatform.googleapis.com": "google",  # Vertex AI's global endpoint
    "api.together.xyz": "together",
    "api.together.ai": "together",
    "api.fireworks.ai": "fireworks",
    "api.mistral.ai": "mistral",
    "api.x.ai": "xai",
    "api.deepseek.com": "deepseek",
    "api.groq.com": "groq",
    "openrouter.ai": "openrouter",
}

# Vertex AI's regional (us-central1-aiplatform.googleapis.com) and multi-region
# (aiplatform.us.rep.googleapis.com) endpoints.
_VERTEX_HOST = re.compile(r"^([a-z0-9-]+-)?aiplatform(\.[a-z0-9-]+\.rep)?\.googleapis\.com$")

# Vertex AI Claude: Anthropic's Messages body on `publishers/anthropic/models/{model}:rawPredict`
# (JSON) or `:streamRawPredict` (SSE); token counting is the pseudo-model `count-tokens`.
_VERTEX_CLAUDE = r"/publishers/anthropic/models/[^/:]+:(raw|streamRaw)Predict"

# AWS Bedrock runtime: bedrock-runtime.<region>.amazonaws.com (and its FIPS twin); the operation
# is the path's last segment after /model/{modelId}/ (an id, a profile id or an URL-encoded ARN).
_BEDROCK_HOST = re.compile(r"^bedrock-runtime(-fips)?\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$")
_BEDROCK_OPERATIONS = ("invoke", "invoke-with-response-stream", "converse", "converse-stream",
                       "count-tokens")

# (wire family, method or None for any, path pattern searched at the end of the path, api).
# The family picks the parser and names the provider of a host that is not a known one.
_ROUTE_SPECS: tuple[tuple[str | None, str | None, str, str], ...] = (
    ("anthropic", "POST", r"/v1/messages", "messages"),
    ("anthropic", "POST", r"/v1/messages/count_tokens", "messages.count_tokens"),
    ("anthropic", None, r"/v1/messages/batches/[^/]+/results", "messages.batches.results"),
    ("anthropic", None, r"/v1/messages/batches(/[^/]+(/cancel)?)?", "messages.batches"),
    ("anthropic", "POST", r"/v1/complete", "complete"),
    ("anthropic", "POST", r"/publishers/anthropic/models/count-tokens:rawPredict",
     "messages.count_tokens"),
    ("anthropic", "POST", _VERTEX_CLAUDE, "messages"),
    ("openai", "POST", r"/chat/completions", "chat.completions"),
    ("openai", "POST", r"/responses/input_tokens", "responses.input_tokens"),
    ("openai", None, r"/responses", "responses"),  # GET: the WebSocket upgrade
    ("openai", None, r"/responses/resp_[^/]+", "responses"),
    ("openai", "POST", r"/completions", "completions"),
    ("openai", "POST", r"/embeddings", "embeddings"),
    # Vertex AI also serves tuned Gemini models from `endpoints/{id}`.
    ("google", "POST", r"/(models|tunedModels|endpoints)/[^/:]+:generateContent", "generateContent"),
    ("google", "POST", r"/(models|tunedModels|endpoints)/[^/:]+:streamGenerateContent",
     "streamGenerateContent"),
    ("google", "POST", r"/models/[^/:]+:countTokens", "countTokens"),
    ("google", "POST", r"/models/[^/:]+:(batchEmbedContents|embedContent)", "embedContent"),
    *(("bedrock", "POST", r"/model/[^/]+/" + op, op) for op in _BEDROCK_OPERATIONS),
    (None, "GET", r"/v1/models(/[^/]+)?", "models"),
    (None, "GET", r"/v1(beta|alpha)?/models(/[^/:]+)?", "models"),
)

_ROUTES: tuple[tuple[str | None, str | None, re.Pattern[str], str], ...] = tuple(
    (family, method, re.compile(pattern + r"$"), api)
    for family, method, pattern, api in _ROUTE_SPECS
)

# The wire family of each api: it picks the parser and the request reader, whatever the host.
WIRE_SHAPES: dict[str, str] = {api: family for family, _, _, api in _ROUTE_SPECS if family}


def wire_shape(api: str) -> str | None:
    """"anthropic", "openai", "google" or "bedrock": whose protocol `api` is; None for unknown and
    models."""
    return WIRE_SHAPES.get(api)


def normalise_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_provider(host: str) -> str | None:
    host = normalise_host(host)
    if host in PROVIDER_HOSTS:
        return PROVIDER_HOSTS[host]
    if _VERTEX_HOST.match(host):
        return "google"
    if _BEDROCK_HOST.match(host):
        return "bedrock"
    if azure.is_azure_host(host):  # {resource}.openai.azure.com: OpenAI's routes under /openai/
        return "azure"
    return None


def classify(host: str, method: str, path: str) -> tuple[str, str]:
    """(provider, api); api is "unknown" for a path no parser understands."""
    bare = re.sub(r"/{2,}", "/", path.split("?", 1)[0].split("#", 1)[0]).rstrip("/")
    known = host_provider(host)
    method = method.upper()
    for family, want_method, pattern, api in _ROUTES:
        if known is None and family is None:
            continue  # a models listing says nothing about which protocol a gateway speaks
        if want_method is not None and method != want_method:
            continue
        if pattern.search(bare):
            return known or family or "unknown", api
    return known or "unknown", "unknown"
