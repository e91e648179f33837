"""Azure OpenAI: OpenAI's wire shapes on `{resource}.openai.azure.com` (also
`*.cognitiveservices.azure.com` and `*.services.ai.azure.com`), keyed by `api-key`.

Paths: `/openai/deployments/{deployment}/chat/completions|completions|embeddings` (the request
names a deployment, not a model: the record's model is the reply's `model`, the deployment is kept
as `request.deployment`), `/openai/responses` and the v1 API `/openai/v1/chat/completions|
responses`, each with `?api-version=...`; their ends are the OpenAI routes classify already knows.
Azure adds `prompt_filter_results` (a first stream chunk with empty `choices`) and
`content_filter_results` to what OpenAI sends (llmtap.parsers.openai_chat reads them).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs

from llmtap import hostpatterns

HOSTS = ("*.openai.azure.com", "*.cognitiveservices.azure.com", "*.services.ai.azure.com")
_DEPLOYMENT = re.compile(r"/openai/deployments/([^/?#]+)/")
# stream_options (usage in a stream) came with api-version 2024-09-01-preview; the v1 API has it.
_STREAM_OPTIONS_SINCE = "2024-09-01"


def is_azure_host(host: str) -> bool:
    """One label under an Azure OpenAI domain (the resource name)."""
    return hostpatterns.host_set(HOSTS).matches(host)


def request_extra(path: str) -> dict[str, Any]:
    """`deployment` and `api_version` from the path and query (the record's `request`)."""
    base, _, query = path.partition("?")
    found = _DEPLOYMENT.search(base + "/")
    version = parse_qs(query).get("api-version", [None])[0]
    if version is None and base.startswith("/openai/v1/"):
        version = "v1"  # the v1 API needs none
    return {"deployment": found.group(1) if found else None, "api_version": version}


def stream_options_supported(api_version: str | None) -> bool:
    """Whether the api-version accepts `stream_options` (older ones refuse it with a 400)."""
    if not api_version:
        return False
    return not api_version[:1].isdigit() or api_version >= _STREAM_OPTIONS_SINCE  # v1, preview
