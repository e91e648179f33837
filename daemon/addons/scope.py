"""Decides per connection whether it is a target: only SNI-matched targets are ever decrypted.

Everything else is relayed as raw TCP (mitmproxy's `allow_hosts`, anchored here so that
`api.openai.com.evil.example` or `xapi.openai.com` never match, and a wildcard target such as
`*.openai.azure.com` matches one label only), and the client sees the real server's certificate.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmtap import hostpatterns
from mitmproxy import ctx, exceptions

NOTHING = r"^$"


def allow_patterns(hosts: Sequence[str]) -> list[str]:
    """Anchored regexes for mitmproxy, which matches them against `host:port`."""
    return hostpatterns.HostSet.of(hosts).allow_regexes()


class Scope:
    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option(
            "llmtap_targets", Sequence[str], [], "Host names whose TLS llmtap decrypts."
        )

    def configure(self, updated: set[str]) -> None:
        if "llmtap_targets" not in updated:
            return
        try:
            hosts = [hostpatterns.check(h) for h in ctx.options.llmtap_targets]
        except ValueError as exc:
            raise exceptions.OptionsError(f"llmtap_targets: {exc}") from None
        # An empty allow list would mean "decrypt everything" to mitmproxy: with no targets,
        # allow a pattern no host:port can match, so everything is passed through.
        ctx.options.allow_hosts = allow_patterns(hosts) if hosts else [NOTHING]
