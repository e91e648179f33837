"""What a request filter rule is, and the checks `llmtap rules add` makes before storing one.

    scope   action        target                      match applies to
    header  remove | set  header name                 the header names
    body    json_path     JSON path (see jsonpath.py)  `pattern` against the value there
    body    text_replace  text or regex               every unprotected string of the body

`match` is exact | contains | regex; regexes are RE2 (linear time, no backtracking). Rules run in
ascending `priority`, equal priorities in creation order.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, replace
from typing import Any

import re2
from llmtap.rules.jsonpath import PathError, parse_path

SCOPES = ("header", "body")
ACTIONS = {"header": ("remove", "set"), "body": ("json_path", "text_replace")}
MATCHES = ("exact", "contains", "regex")
DEFAULT_PRIORITY = 100
# Framing headers: the proxy owns them; a rule changing them would corrupt the exchange.
FRAMING_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "upgrade",
                             "te", "trailer", "keep-alive", "proxy-connection"})
# Values shown as **** by `rules list`/`show`: a header rule may carry a credential.
SENSITIVE_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "api-key",
                               "x-goog-api-key", "cookie", "openai-organization"})
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_GROUP_REF = re.compile(r"\\(\d{1,2}|g<([^>]*)>|\\)")
Regex = Any  # an re2 regex (google-re2 ships no type hints)


class RuleError(ValueError):
    """A rule that cannot be stored or run; the message names the field."""


@dataclass(frozen=True)
class Rule:
    scope: str
    action: str
    match: str
    target: str
    replacement: str = ""
    pattern: str = ""  # json_path only: what to look for in the value (empty: the whole value)
    priority: int = DEFAULT_PRIORITY
    enabled: bool = True
    description: str = ""
    hosts: tuple[str, ...] = ()  # globs; empty: every target host
    paths: tuple[str, ...] = ()  # globs, or prefixes when they have no glob character
    id: int = 0  # assigned by the store; also the creation order
    created_at: str = ""

    def sort_key(self) -> tuple[int, int]:
        return (self.priority, self.id)

    def applies_to(self, host: str, path: str) -> bool:
        host = host.lower()
        if self.hosts and not any(fnmatch.fnmatchcase(host, h.lower()) for h in self.hosts):
            return False
        bare = path.split("?", 1)[0]
        return not self.paths or any(_path_matches(bare, p) for p in self.paths)

    def summary(self) -> str:
        """One line for people; never a sensitive header's value."""
        value = self.shown_replacement()
        if self.scope == "header":
            what = (f"{self.action} header {self.match} {self.target!r}"
                    + (f" = {value!r}" if self.action == "set" else ""))
        elif self.action == "json_path":
            look = f" {self.match} {self.pattern!r}" if self.pattern else ""
            what = f"json_path {self.target}{look} -> {value!r}"
        else:
            what = f"text_replace {self.match} {self.target!r} -> {value!r}"
        return what

    def shown_replacement(self) -> str:
        if self.scope == "header" and self.replacement and _names_sensitive(self):
            return "****"
        return self.replacement


def _names_sensitive(rule: Rule) -> bool:
    if rule.match == "exact":
        return rule.target.lower() in SENSITIVE_HEADERS
    return True if rule.match == "regex" else any(rule.target.lower() in h for h in SENSITIVE_HEADERS)


def _path_matches(path: str, pattern: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(path, pattern)
    return path == pattern or path.startswith(pattern.rstrip("/") + "/")


def regex_options(case_sensitive: bool = True) -> re2.Options:
    options = re2.Options()
    options.case_sensitive = case_sensitive
    options.log_errors = False  # the reason is in the exception; RE2 would also print it
    return options


def re2_reason(exc: Exception) -> str:
    reason = exc.args[0] if exc.args else str(exc)
    return reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)


def compile_regex(pattern: str, case_sensitive: bool = True, what: str = "pattern") -> Regex:
    """An RE2 regex, or RuleError with the engine's reason (backreferences, lookaround, ...)."""
    try:
        return re2.compile(pattern, regex_options(case_sensitive))
    except re2.error as exc:
        raise RuleError(f"{what} {pattern!r} is not supported by RE2: {re2_reason(exc)}") from None
    except (TypeError, ValueError) as exc:
        raise RuleError(f"{what} {pattern!r} is not a valid regex: {exc}") from None


def refuse_empty_matches(regex: Regex, what: str) -> None:
    """A pattern that can match nothing would insert its replacement between every character."""
    probe = " aZ0_-.\n"
    if regex.search("") is not None or any(m.end() == m.start() for m in regex.finditer(probe)):
        raise RuleError(f"{what} {regex.pattern!r} can match the empty string")


def check_template(template: str, regex: Regex) -> None:
    r"""A regex replacement may use \1..\99 and \g<name>; each must exist in the regex."""
    names = regex.groupindex
    for match in _GROUP_REF.finditer(template):
        ref = match.group(1)
        if ref == "\\":
            continue
        name = match.group(2)
        if name is None:
            if int(ref) > regex.groups:
                raise RuleError(f"replacement refers to group {ref}, the regex has {regex.groups}")
        elif not (name in names or (name.isdigit() and int(name) <= regex.groups)):
            raise RuleError(f"replacement refers to group {name!r}, which the regex does not have")


def validate(rule: Rule) -> Rule:
    """The rule, normalised, or RuleError naming the field that is wrong."""
    if rule.scope not in SCOPES:
        raise RuleError(f"--scope must be one of {', '.join(SCOPES)}, not {rule.scope!r}")
    if rule.action not in ACTIONS[rule.scope]:
        raise RuleError(f"--action for scope {rule.scope} must be one of "
                        f"{', '.join(ACTIONS[rule.scope])}, not {rule.action!r}")
    if rule.match not in MATCHES:
        raise RuleError(f"--match must be one of {', '.join(MATCHES)}, not {rule.match!r}")
    if not rule.target:
        raise RuleError("--target must not be empty")
    for host in rule.hosts:
        if not host or any(c.isspace() for c in host):
            raise RuleError(f"--host {host!r} is not a host name or glob")
    for path in rule.paths:
        if not path.startswith(("/", "*")):
            raise RuleError(f"--path {path!r} must start with / (or be a glob)")
    check = {"header": _validate_header, "body": _validate_body}[rule.scope]
    check(rule)
    return replace(rule, hosts=tuple(h.lower() for h in rule.hosts))


def _validate_header(rule: Rule) -> None:
    if rule.pattern:
        raise RuleError("--pattern is for json_path rules only")
    if rule.match == "regex":
        compile_regex(rule.target, case_sensitive=False, what="--target")
    elif rule.match == "exact":
        if not _TOKEN.match(rule.target):
            raise RuleError(f"--target {rule.target!r} is not a valid header name")
        if rule.target.lower() in FRAMING_HEADERS:
            raise RuleError(f"--target {rule.target!r} is managed by the proxy and cannot be changed")
    if rule.action == "remove" and rule.replacement:
        raise RuleError("--replacement makes no sense for a header remove rule")
    if any(c in rule.replacement for c in "\r\n\0"):
        raise RuleError("--replacement must not contain line breaks or NUL in a header value")


def _validate_body(rule: Rule) -> None:
    if rule.action == "json_path":
        try:
            parse_path(rule.target)
        except PathError as exc:
            raise RuleError(f"--target: {exc}") from None
        if rule.match != "exact" and not rule.pattern:
            raise RuleError(f"--pattern is required with --match {rule.match} on a json_path rule")
        if rule.match == "regex":
            regex = compile_regex(rule.pattern, what="--pattern")
            refuse_empty_matches(regex, "--pattern")
            check_template(rule.replacement, regex)
        return
    if rule.pattern:
        raise RuleError("--pattern is for json_path rules only; text_replace uses --target")
    if rule.match == "regex":
        regex = compile_regex(rule.target, what="--target")
        refuse_empty_matches(regex, "--target")
        check_template(rule.replacement, regex)


def expand(template: str, match: Any) -> str:
    r"""The replacement for one regex match: \1..\99 and \g<name> are groups, \\ a backslash.

    Not re2's own expand(), which unicode-escape-decodes the template and so mangles non-ASCII.
    """
    if "\\" not in template:
        return template

    def group(ref: re.Match[str]) -> str:
        if ref.group(1) == "\\":
            return "\\"
        name = ref.group(2)
        key: int | str = int(ref.group(1)) if name is None else (int(name) if name.isdigit() else name)
        return match.group(key) or ""

    return _GROUP_REF.sub(group, template)
