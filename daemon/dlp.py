"""Secret and sensitive-data detection in request bodies (the "dlp" pipeline stage's engine).

Built-in detectors (BUILTIN) plus the user's `[[dlp.patterns]]`, each with an action: `redact`
(the match becomes `[REDACTED:<detector>]`), `block` (the request never leaves; the client gets a
provider-shaped 403), `alert` (recorded and logged only) or `off`. A detector's regex may name
a group `secret`: only that part is redacted. Findings carry the detector, the action and where
(a JSON path), never the matched value.

Bodies are scanned as their unprotected strings joined (see llmtap.rules.strings), gated by one
RE2 Set pass; streamed bodies are scanned chunk by chunk with a bounded look-back window
(StreamRedactor), so no body is ever held whole.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import re2
from llmtap.rules.model import re2_reason, regex_options
from llmtap.rules.strings import Strings

if TYPE_CHECKING:
    from llmtap.config import DlpConfig

ACTIONS = ("redact", "block", "alert", "off")
HELD_KEY = "held_key"  # the detector of the real keys llmtap holds, found by value (llmtap.masking)
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
SET_MAX_MEM = 64 << 20
STREAM_WINDOW = 32 * 1024  # held back from a streamed body: longer than any built-in secret

Span = tuple[int, int]
Validator = Callable[[str], Span | None]  # the valid part of a match, relative to it, or None


def _luhn_ok(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _issuer_ok(d: str) -> bool:
    """Issuer prefix and length (Visa, Mastercard, Amex, Discover, Diners, JCB, UnionPay)."""
    n, two, three, four = len(d), int(d[:2]), int(d[:3]), int(d[:4])
    if d[0] == "4":
        return n in (13, 16, 19)
    if two in (34, 37):
        return n == 15
    if 51 <= two <= 55 or 2221 <= four <= 2720:
        return n == 16
    if four == 6011 or two in (62, 65) or 644 <= three <= 649 or 3528 <= four <= 3589:
        return 16 <= n <= 19
    if two in (36, 38, 39) or 300 <= three <= 305:
        return 14 <= n <= 19
    return False


_GROUPS = re.compile(r"[0-9]+")


def card_number(text: str) -> Span | None:
    """The first run of digit groups in `text` (a maximal run of digits, spaces and dashes) that
    is a card number: 13-19 digits, a known issuer, and a valid Luhn check digit."""
    groups = [(m.start(), m.end()) for m in _GROUPS.finditer(text)]
    for first in range(len(groups)):
        digits = ""
        for last in range(first, len(groups)):
            digits += text[groups[last][0]:groups[last][1]]
            if len(digits) > 19:
                break
            if len(digits) >= 13 and _issuer_ok(digits) and _luhn_ok(digits):
                return groups[first][0], groups[last][1]
    return None


class Builtin(NamedTuple):
    pattern: str  # RE2; reads the same in a JSON string and in raw JSON (a quote may be escaped)
    prefilter: str  # finds, in the raw body, a superset of what `pattern` finds in its strings:
    # only characters JSON never escapes, so a body where it finds nothing is not parsed at all
    validate: Validator | None = None


BUILTIN: dict[str, Builtin] = {
    "aws_access_key": Builtin(r"\b(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z2-7]{16}\b",
                              r"(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z2-7]{16}"),
    "aws_secret_key": Builtin(
        r"(?i)aws_?secret_?(?:access_?)?key\\{0,3}[\"']?\s*[:=]\s*\\{0,3}[\"']?"
        r"(?P<secret>[A-Za-z0-9/+]{40})(?:[^A-Za-z0-9/+=]|$)", r"(?i)aws_?secret_?(?:access_?)?key"),
    "gcp_service_account": Builtin(
        r"private_key_id\\{0,3}\"\s*:\s*\\{0,3}\"(?P<secret>[0-9a-f]{40})\\{0,3}\"", r"private_key_id"),
    "github_token": Builtin(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b",
                            r"gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22}"),
    "gitlab_token": Builtin(r"\bgl(?:pat|dt|rt|ptt|cbt|oas|soat|ft|imt)-[A-Za-z0-9_-]{20,}",
                            r"gl(?:pat|dt|rt|ptt|cbt|oas|soat|ft|imt)-[A-Za-z0-9_-]{20}"),
    "slack_token": Builtin(r"\bxox[abposre]-[A-Za-z0-9-]{10,}"
                           r"|https://hooks\.slack\.com/(?:services|workflows)/[A-Za-z0-9/_-]{20,}",
                           r"xox[abposre]-[A-Za-z0-9-]{10}|hooks\.slack\.com"),
    "private_key": Builtin(
        r"-----BEGIN[A-Z0-9 ]{0,40} PRIVATE KEY(?: BLOCK)?-----"
        r"(?:[\s\S]*?-----END[A-Z0-9 ]{0,40} PRIVATE KEY(?: BLOCK)?-----|[A-Za-z0-9+/=\s\\]*)",
        r"-----BEGIN[A-Z0-9 ]{0,40} PRIVATE KEY"),
    "jwt": Builtin(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}",
                   r"eyJ[A-Za-z0-9_-]{8,}\.eyJ"),
    "llm_api_key": Builtin(
        r"\b(?:sk-ant-[A-Za-z0-9_-]{32,}|sk-(?:proj|svcacct|admin)-[A-Za-z0-9_-]{32,}"
        r"|sk-or-v1-[0-9a-f]{64}|sk-[A-Za-z0-9]{32,}|AIza[0-9A-Za-z_-]{35}|gsk_[A-Za-z0-9]{48,}"
        r"|xai-[A-Za-z0-9]{64,}|hf_[A-Za-z0-9]{34,}|pplx-[A-Za-z0-9]{40,})",
        r"sk-[A-Za-z0-9_-]{32}|AIza[0-9A-Za-z_-]{35}|gsk_[A-Za-z0-9]{48}|xai-[A-Za-z0-9]{64}"
        r"|hf_[A-Za-z0-9]{34}|pplx-[A-Za-z0-9]{40}"),
    "credit_card": Builtin(r"[0-9](?:[ -]?[0-9]){12,}", r"[0-9](?:[ -]?[0-9]){12}", card_number),
}


class PatternError(ValueError):
    """A user pattern RE2 cannot run, or one that matches the empty string."""


def check_pattern(pattern: str) -> Any:
    """The compiled RE2 regex, or PatternError with the engine's reason."""
    try:
        regex = re2.compile(pattern, regex_options())
    except (re2.error, TypeError, ValueError) as exc:
        raise PatternError(f"{pattern!r} is not supported by RE2: {re2_reason(exc)}") from None
    if regex.search("") is not None:
        raise PatternError(f"{pattern!r} matches the empty string")
    return regex


@dataclass(frozen=True)
class Detector:
    name: str
    pattern: str
    action: str
    validate: Validator | None = None
    prefilter: str | None = None  # see Builtin; None (user patterns): no body skips parsing


def held_key_action(config: DlpConfig) -> str:
    """What happens to a held real key found in a request body: `redact` unless configured."""
    if not config.enabled:
        return "off"
    return config.actions.held_key or "redact"


def detectors_from_config(config: DlpConfig) -> list[Detector]:
    """The built-ins with their configured actions, then the user's patterns; none when off."""
    if not config.enabled:
        return []
    detectors = []
    for name, builtin in BUILTIN.items():
        action = getattr(config.actions, name) or config.default_action
        detectors.append(Detector(name, builtin.pattern, action, builtin.validate, builtin.prefilter))
    for user in config.patterns:
        detectors.append(Detector(user.name, user.pattern, user.action or config.default_action))
    return [d for d in detectors if d.action != "off"]


@dataclass(frozen=True)
class Finding:
    detector: str
    action: str
    leaf: int  # index in the Strings scanned (0 for a plain text)
    start: int
    end: int


class _Compiled:
    def __init__(self, detector: Detector) -> None:
        self.detector = detector
        self.regex = re2.compile(detector.pattern, regex_options())
        self.secret_group = self.regex.groupindex.get("secret")
        gateable = "\\A" not in detector.pattern and "\\z" not in detector.pattern
        self.gate = re2.compile(f"(?m:{detector.pattern})", regex_options()) if gateable else None

    def find(self, text: Any) -> list[Span]:
        """Spans of secrets in one string (str) or chunk (bytes)."""
        spans = []
        for match in self.regex.finditer(text):
            start, end = match.span(self.secret_group) if self.secret_group else match.span()
            if start < 0:
                continue
            if self.detector.validate is not None:
                piece = text[start:end]
                valid = self.detector.validate(piece if isinstance(piece, str) else piece.decode("latin-1"))
                if valid is None:
                    continue
                start, end = start + valid[0], start + valid[1]
            spans.append((start, end))
        return spans


class Scanner:
    """All enabled detectors, compiled, behind one RE2 Set gate."""

    def __init__(self, detectors: Sequence[Detector]) -> None:
        self.compiled = [_Compiled(d) for d in detectors]
        options = regex_options()
        options.max_mem = SET_MAX_MEM
        self._set = re2.Set.SearchSet(options)
        self._sentinel = self._set.Add("(?:)")
        self._slots: dict[int, int] = {}
        for index, compiled in enumerate(self.compiled):
            if compiled.gate is not None:
                self._slots[self._set.Add(f"(?m:{compiled.detector.pattern})")] = index
        self._set.Compile()
        self._prefilter: Any = None
        if self.compiled and all(c.detector.prefilter for c in self.compiled):
            self._prefilter = re2.compile(
                "|".join(f"(?:{c.detector.prefilter})" for c in self.compiled), regex_options())

    def may_find(self, content: bytes) -> bool:
        """False when no detector can find anything in this raw body: it need not be parsed.
        (Always True with user patterns, which have no prefilter.)"""
        return self._prefilter is None or self._prefilter.search(content) is not None

    def __bool__(self) -> bool:
        return bool(self.compiled)

    def _found(self, data: bytes) -> set[int] | None:
        found = set(self._set.Match(data) or ())
        return found if self._sentinel in found else None  # None: the Set's DFA gave up

    def _possible(self, *texts: bytes) -> list[_Compiled]:
        wanted: set[int] = set()
        for data in texts:
            found = self._found(data)
            if found is None:
                return list(self.compiled)
            wanted |= {self._slots[i] for i in found if i in self._slots}
        return [c for i, c in enumerate(self.compiled) if i in wanted or c.gate is None]

    def scan(self, strings: Strings) -> list[Finding]:
        """Findings in every unprotected string (changed ones included, as they are now)."""
        if not self.compiled or not len(strings):
            return []
        data = strings.snapshot()
        texts = (data, strings.dirty_text()) if strings.dirty else (data,)
        findings = []
        for compiled in self._possible(*texts):
            leaves: Iterable[int] = (range(len(strings)) if compiled.gate is None else
                                     strings.touching(m.span() for m in compiled.gate.finditer(data)))
            for leaf in leaves:
                for start, end in compiled.find(strings.values[leaf]):
                    findings.append(Finding(compiled.detector.name, compiled.detector.action,
                                            leaf, start, end))
        return findings

    def scan_chunk(self, data: bytes) -> list[Finding]:
        """Findings in raw bytes (a streamed body); `leaf` is 0, offsets are byte offsets."""
        findings = []
        for compiled in self._possible(data):
            for start, end in compiled.find(data):
                start, end = escape_safe(data, start, end)
                findings.append(Finding(compiled.detector.name, compiled.detector.action, 0,
                                        start, end))
        return findings


def marker(detector: str) -> str:
    return f"[REDACTED:{detector}]"


def _merged(findings: Iterable[Finding]) -> list[Finding]:
    """Non-overlapping findings in order; of overlapping ones the earliest (then longest) wins."""
    out: list[Finding] = []
    for finding in sorted(findings, key=lambda f: (f.start, -f.end)):
        if out and finding.start < out[-1].end:
            continue
        out.append(finding)
    return out


def redact_text(text: str, findings: Iterable[Finding]) -> str:
    pieces, position = [], 0
    for finding in _merged(findings):
        pieces += [text[position:finding.start], marker(finding.detector)]
        position = finding.end
    pieces.append(text[position:])
    return "".join(pieces)


def fitted_marker(detector: str, size: int) -> bytes:
    """A marker exactly `size` bytes long: a streamed body's length was announced before its
    bytes passed (content-length), so redaction there must not change it."""
    for text in (marker(detector), "[REDACTED]"):
        if len(text) <= size:
            return (text[:-1] + "*" * (size - len(text)) + "]").encode()
    return b"*" * size


def redact_bytes(data: bytes, findings: Iterable[Finding]) -> bytes:
    """Redaction that keeps the length (see fitted_marker)."""
    pieces, position = [], 0
    for finding in _merged(findings):
        size = finding.end - finding.start
        pieces += [data[position:finding.start], fitted_marker(finding.detector, size)]
        position = finding.end
    pieces.append(data[position:])
    return b"".join(pieces)


def escape_safe(data: bytes, start: int, end: int) -> Span:
    """Widens a span of raw JSON so it neither starts nor ends inside a backslash escape (a
    redaction must not leave `\\[` or eat the backslash of `\\"`)."""

    def escaped(position: int) -> bool:  # preceded by an odd run of backslashes
        run = 0
        while position - run - 1 >= 0 and data[position - run - 1] == 0x5C:
            run += 1
        return run % 2 == 1

    if start > 0 and escaped(start):
        start -= 1
    if end < len(data) and escaped(end):
        end += 1
    return start, end


class StreamRedactor:
    """A mitmproxy stream callable for a request body too large to hold: scans each chunk with
    the last STREAM_WINDOW bytes before it, holding those back until the next chunk (or the
    end), so a secret split across chunks is still seen whole. Every detector redacts here,
    keeping the body's length: a streamed request has already left, so `block` can only cut
    it short (see the addon)."""

    def __init__(self, scanner: Scanner, on_finding: Callable[[Finding], None],
                 window: int = STREAM_WINDOW) -> None:
        self.scanner = scanner
        self.on_finding = on_finding
        self.window = window
        self._carry = b""

    def __call__(self, chunk: bytes) -> bytes:
        final = chunk == b""
        data = self._carry + chunk
        findings = self.scanner.scan_chunk(data)
        cut = len(data) if final else max(0, len(data) - self.window)
        for finding in sorted(findings, key=lambda f: f.start, reverse=True):
            if finding.start < cut < finding.end:  # not complete yet, maybe: keep it whole
                cut = finding.start
        done = [f for f in findings if f.end <= cut]
        for finding in _merged(done):
            self.on_finding(finding)
        self._carry = data[cut:]
        return redact_bytes(data[:cut], done)


@functools.cache
@functools.cache  # compiling the RE2 set costs more than a scan; a Scanner keeps no state
def _builtin_scanner() -> Scanner:
    return Scanner([Detector(name, b.pattern, "redact", b.validate, b.prefilter)
                    for name, b in BUILTIN.items()])


def mask_known_secrets(text: str) -> str:
    """Every built-in detector's finding in free text (command lines, Markdown) replaced by its
    typed marker: what the DLP stage catches in prompts never reaches a record another way."""
    data = text.encode()
    findings = _merged(_builtin_scanner().scan_chunk(data))
    if not findings:
        return text
    pieces, position = [], 0
    for finding in findings:
        pieces += [data[position:finding.start], marker(finding.detector).encode()]
        position = finding.end
    pieces.append(data[position:])
    return b"".join(pieces).decode(errors="replace")
