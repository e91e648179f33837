"""Where each provider's tools expect their API key, and what its keys look like.

The secret store (llmtap.secrets_store) picks a secret's default header here, `llmtap secrets
env` names the variables, and a new secret's placeholder takes the shape of the real key.
"""

from __future__ import annotations

import secrets
import string

from llmtap import hostpatterns
from llmtap.parsers.classify import host_provider

# Where each provider's tools expect their key, and which variables they read it from.
DEFAULT_HEADERS = {
    "api.anthropic.com": "x-api-key",
    "generativelanguage.googleapis.com": "x-goog-api-key",
    "*.openai.azure.com": "api-key",
    "*.cognitiveservices.azure.com": "api-key",
    "*.services.ai.azure.com": "api-key",
}
ENV_VARS = {
    "api.anthropic.com": ("ANTHROPIC_API_KEY",),
    "api.openai.com": ("OPENAI_API_KEY", "CODEX_API_KEY"),
    "generativelanguage.googleapis.com": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
    "api.mistral.ai": ("MISTRAL_API_KEY",),
    "api.x.ai": ("XAI_API_KEY",),
    "api.deepseek.com": ("DEEPSEEK_API_KEY",),
    "api.groq.com": ("GROQ_API_KEY",),
    "openrouter.ai": ("OPENROUTER_API_KEY",),
    "*.openai.azure.com": ("AZURE_OPENAI_API_KEY",),
    "*.cognitiveservices.azure.com": ("AZURE_OPENAI_API_KEY",),
    "*.services.ai.azure.com": ("AZURE_OPENAI_API_KEY",),
}


def env_vars(host: str) -> tuple[str, ...]:
    """The variables the tools for `host` read its key from. AWS Bedrock's regional runtime hosts
    take an API key as a bearer token (boto3 and AnthropicBedrock read this variable)."""
    sample = next(iter(hostpatterns.parse(host).names), host)  # a region pattern: its first name
    if host_provider(sample) == "bedrock":
        return ("AWS_BEARER_TOKEN_BEDROCK",)
    return ENV_VARS.get(provider_host(host), ())


def provider_host(host: str) -> str:
    """The key of DEFAULT_HEADERS and ENV_VARS for `host`: itself, or the wildcard it is under
    (an Azure resource `myres.openai.azure.com` is `*.openai.azure.com`)."""
    wildcards = (w for w in ENV_VARS if w.startswith("*."))
    return next((w for w in wildcards if hostpatterns.parse(w).matches(host)), host)


_URLSAFE = string.ascii_letters + string.digits + "-_"
_ALNUM = string.ascii_letters + string.digits
_HEX = "0123456789abcdef"


def _random(alphabet: str, length: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


# Placeholders have the shape of the provider's real keys (client-side format checks pass) and
# at least 190 random bits, so nobody can guess one that llmtap would fill in.
_FORMATS = {
    "anthropic": lambda: "sk-ant-api03-" + _random(_URLSAFE, 93) + "AA",
    "openai": lambda: "sk-proj-" + _random(_URLSAFE, 74) + "T3BlbkFJ" + _random(_URLSAFE, 74),
    "google": lambda: "AIza" + _random(_URLSAFE, 35),
    "mistral": lambda: _random(_ALNUM, 32),
    "xai": lambda: "xai-" + _random(_ALNUM, 80),
    "deepseek": lambda: "sk-" + _random(_HEX, 48),
    "groq": lambda: "gsk_" + _random(_ALNUM, 52),
    "openrouter": lambda: "sk-or-v1-" + _random(_HEX, 64),
    "bedrock": lambda: "ABSK" + _random(_ALNUM, 128),  # a long-term Bedrock API key's prefix
    "generic": lambda: "sk-" + _random(_ALNUM, 48),
}
_FORMAT_BY_HOST = {
    "api.anthropic.com": "anthropic",
    "api.openai.com": "openai",
    "generativelanguage.googleapis.com": "google",
    "api.mistral.ai": "mistral",
    "api.x.ai": "xai",
    "api.deepseek.com": "deepseek",
    "api.groq.com": "groq",
    "openrouter.ai": "openrouter",
}
_FORMAT_BY_PREFIX = (("sk-ant-", "anthropic"), ("sk-or-", "openrouter"), ("sk-", "openai"),
                     ("AIza", "google"), ("xai-", "xai"), ("gsk_", "groq"), ("ABSK", "bedrock"),
                     ("bedrock-api-key-", "bedrock"))


def make_placeholder(hosts: tuple[str, ...], value: str | None) -> str:
    """A placeholder shaped like the key the first host expects (else like the value itself)."""
    kind = _FORMAT_BY_HOST.get(hosts[0]) if hosts else None
    if hosts and host_provider(hosts[0]) == "bedrock":
        kind = "bedrock"
    if kind is None and value:
        kind = next((k for prefix, k in _FORMAT_BY_PREFIX if value.startswith(prefix)), None)
    return _FORMATS[kind or "generic"]()
