"""Target host names and the two wildcard forms a target, or a secret's host, may take.

- `api.openai.com`: one concrete name.
- `*.openai.azure.com`: any ONE label in place of the `*` (as a TLS wildcard): it matches
  `myres.openai.azure.com`, never `openai.azure.com` nor `a.b.openai.azure.com`. The part after
  the `*` needs two labels at least and must not be a public suffix alone (`*.com`, `*.co.uk`
  and shared hosting suffixes such as `*.azurewebsites.net` are refused).
- `bedrock-runtime.*.amazonaws.com`, `*-aiplatform.googleapis.com`: a `*` anywhere else is a
  REGION: it stands for one of the cloud regions shipped below (AWS for amazonaws.com names,
  Google Cloud for googleapis.com names) and nothing else, so such a pattern is a finite list
  of concrete names: the CA vouches for exactly those, and each is resolved for the redirect.

A leftmost `*` matches names no one can list in advance (your Azure resources), so the CA is
constrained to the part after it, and the redirect (scope "targets") only knows the addresses
of the concrete names the targets list under it (see README, "Azure OpenAI").
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$)(?:{LABEL}\.)+[a-z]{{2,63}}$")

AWS_REGIONS = (
    "us-east-1", "us-east-2", "us-west-1", "us-west-2", "us-gov-east-1", "us-gov-west-1",
    "ca-central-1", "ca-west-1", "mx-central-1", "sa-east-1", "af-south-1", "il-central-1",
    "me-south-1", "me-central-1", "eu-central-1", "eu-central-2", "eu-west-1", "eu-west-2",
    "eu-west-3", "eu-south-1", "eu-south-2", "eu-north-1", "ap-east-1", "ap-east-2",
    "ap-south-1", "ap-south-2", "ap-northeast-1", "ap-northeast-2", "ap-northeast-3",
    "ap-southeast-1", "ap-southeast-2", "ap-southeast-3", "ap-southeast-4", "ap-southeast-5",
    "ap-southeast-7",
)
GCP_REGIONS = (
    "us-central1", "us-east1", "us-east4", "us-east5", "us-south1", "us-west1", "us-west2",
    "us-west3", "us-west4", "northamerica-northeast1", "northamerica-northeast2",
    "southamerica-east1", "southamerica-west1", "europe-west1", "europe-west2", "europe-west3",
    "europe-west4", "europe-west6", "europe-west8", "europe-west9", "europe-west10",
    "europe-west12", "europe-north1", "europe-central2", "europe-southwest1", "asia-east1",
    "asia-east2", "asia-northeast1", "asia-northeast2", "asia-northeast3", "asia-south1",
    "asia-south2", "asia-southeast1", "asia-southeast2", "australia-southeast1",
    "australia-southeast2", "me-central1", "me-central2", "me-west1", "africa-south1",
)
REGION_DOMAINS = {"amazonaws.com": AWS_REGIONS, "googleapis.com": GCP_REGIONS}

# Second-level labels that, under a two-letter country code, make a public suffix (co.uk,
# com.au, ne.jp); and suffixes where anyone can get a name. No public suffix list ships with
# llmtap's dependencies: this refuses the broad cases, the two-label minimum the rest.
GENERIC_SLDS = frozenset(("co", "com", "net", "org", "gov", "edu", "ac", "or", "ne", "go", "gob",
                          "gv", "mil", "ltd", "plc", "nic", "nom", "sch", "info", "biz"))
SHARED_SUFFIXES = frozenset((
    "azurewebsites.net", "cloudapp.net", "cloudapp.azure.com", "azurestaticapps.net",
    "azurecontainerapps.io", "azure-api.net", "azurefd.net", "trafficmanager.net",
    "blob.core.windows.net", "web.core.windows.net", "windows.net", "cloudfront.net",
    "elasticbeanstalk.com", "herokuapp.com", "github.io", "githubusercontent.com", "gitlab.io",
    "appspot.com", "web.app", "firebaseapp.com", "run.app", "cloudfunctions.net", "pages.dev",
    "workers.dev", "vercel.app", "netlify.app", "fly.dev", "onrender.com", "ngrok.io",
    "ngrok-free.app", "blogspot.com", "s3.amazonaws.com", "compute.amazonaws.com",
))


@dataclass(frozen=True)
class HostPattern:
    """One target or secret host: a name, a leftmost wildcard or a region pattern."""

    text: str
    regex: re.Pattern[str]
    names: tuple[str, ...]  # the concrete names it stands for (none for a leftmost wildcard)
    subtree: str | None  # a leftmost wildcard: the domain its names are under

    @property
    def wildcard(self) -> bool:
        return self.subtree is not None

    def matches(self, host: str) -> bool:
        return bool(self.regex.match(canonical(host)))


def normalise(host: str) -> str:
    """A name as a user typed it (config, --host): spaces, case and a trailing dot do not count."""
    return host.strip().lower().rstrip(".")


def canonical(host: str) -> str:
    """A name from the wire (SNI, Host) as it is matched: case and one trailing dot do not count,
    anything else does. Not ASCII is no match: str.lower() turns the Kelvin sign into "k" (IDNA
    names travel as xn--)."""
    if not host.isascii():
        return ""
    host = host.lower()
    return host[:-1] if host.endswith(".") else host


def parse(text: str) -> HostPattern:
    """The pattern `text` stands for; ValueError (a reason) for anything else."""
    host = normalise(text)
    if "*" not in host:
        if not HOSTNAME_RE.match(host):
            raise ValueError("is not a host name")
        return HostPattern(host, re.compile(re.escape(host) + r"\Z"), (host,), None)
    if host == "*":
        raise ValueError("would match every host")
    if host.count("*") > 1:
        raise ValueError("may hold one * only")
    if host.startswith("*."):
        return _leftmost(host)
    return _regional(host)


def _leftmost(host: str) -> HostPattern:
    rest = host[2:]
    if not HOSTNAME_RE.match(rest) or rest.count(".") < 1:
        raise ValueError("needs at least two labels after its *. (as in *.openai.azure.com)")
    sld, _, tld = rest.rpartition(".")
    if rest in SHARED_SUFFIXES or (len(tld) == 2 and sld in GENERIC_SLDS) or rest in REGION_DOMAINS:
        raise ValueError(f"is too broad: anyone can get a name under {rest}")
    regex = re.compile(rf"{LABEL}\.{re.escape(rest)}\Z")
    return HostPattern(host, regex, (), rest)


def _regional(host: str) -> HostPattern:
    domain = next((d for d in REGION_DOMAINS if host.endswith("." + d)), None)
    if domain is None:
        raise ValueError("puts its * inside the name, which only stands for a region of "
                         f"{' or '.join(REGION_DOMAINS)} names (else use a leftmost *.)")
    regions = REGION_DOMAINS[domain]
    names = tuple(host.replace("*", region) for region in regions)
    if not all(HOSTNAME_RE.match(name) for name in names):
        raise ValueError("does not make a host name with a region in place of its *")
    alternatives = "|".join(re.escape(r) for r in regions)
    head, _, tail = host.partition("*")
    return HostPattern(host, re.compile(rf"{re.escape(head)}(?:{alternatives}){re.escape(tail)}\Z"),
                       names, None)


def check(text: str) -> str:
    """The normalised pattern, or ValueError naming it and why."""
    try:
        return parse(text).text
    except ValueError as exc:
        raise ValueError(f"{normalise(text)!r} {exc}") from None


@dataclass(frozen=True)
class HostSet:
    """Several patterns: the targets, or the hosts one secret is bound to."""

    patterns: tuple[HostPattern, ...]
    exact: frozenset[str]

    @classmethod
    def of(cls, texts: Iterable[str]) -> HostSet:
        patterns = tuple(parse(t) for t in dict.fromkeys(texts))
        exact = frozenset(n for p in patterns if not p.wildcard for n in p.names)
        return cls(patterns, exact)

    def matches(self, host: str) -> bool:
        host = canonical(host)
        return host in self.exact or any(p.regex.match(host) for p in self.patterns if p.wildcard)

    def covers(self, pattern: HostPattern) -> bool:
        """Whether every name `pattern` stands for is one of these (a secret's host, a target)."""
        if pattern.wildcard:
            return any(p.text == pattern.text for p in self.patterns)
        return all(self.matches(name) for name in pattern.names)

    @property
    def resolvable(self) -> tuple[str, ...]:
        """The concrete names, whose addresses the redirect needs (scope "targets")."""
        return tuple(dict.fromkeys(n for p in self.patterns for n in p.names))

    @property
    def unresolvable(self) -> tuple[str, ...]:
        """Leftmost wildcards with no concrete name under them: nothing to resolve for them."""
        names = self.resolvable
        return tuple(p.text for p in self.patterns
                     if p.wildcard and not any(p.regex.match(n) for n in names))

    @property
    def subtrees(self) -> tuple[str, ...]:
        """What the CA may vouch for: each name, and the domain under a leftmost wildcard."""
        wide = [p.subtree for p in self.patterns if p.subtree]
        names = [n for p in self.patterns for n in p.names
                 if not any(n.endswith("." + w) for w in wide)]
        return tuple(dict.fromkeys([*wide, *names]))

    def allow_regexes(self) -> list[str]:
        """Anchored regexes for mitmproxy's allow_hosts, which searches `host:port` with them."""
        # (?a): mitmproxy adds IGNORECASE, which without it lets the Kelvin sign match "k"
        return [rf"(?a)^{p.regex.pattern.removesuffix(chr(92) + 'Z')}:\d+$" for p in self.patterns]


@functools.lru_cache(maxsize=16)
def host_set(texts: tuple[str, ...]) -> HostSet:
    """The HostSet of `texts`, made once (a TLS handshake asks for the targets' each time)."""
    return HostSet.of(texts)


def within(name: str, subtree: str) -> bool:
    """Whether an X.509 permitted DNS subtree covers `name` (the name or any name under it)."""
    return name == subtree or name.endswith("." + subtree)
