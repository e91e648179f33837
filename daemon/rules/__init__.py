"""Request filter rules: the model (model.py), JSON paths (jsonpath.py), the strings of a body
that text rules and DLP may change (strings.py), the engine (engine.py) and the SQLite store
(store.py). The pipeline stage is llmtap.addons.filters; the commands are `llmtap rules ...`."""

from llmtap.rules.engine import Outcome, RuleSet
from llmtap.rules.model import Rule, RuleError, validate
from llmtap.rules.store import RuleSource, RuleStore, db_path
from llmtap.rules.strings import DEFAULT_PROTECTED_FIELDS, Body, Protected

__all__ = [
    "DEFAULT_PROTECTED_FIELDS",
    "Body",
    "Outcome",
    "Protected",
    "Rule",
    "RuleError",
    "RuleSet",
    "RuleSource",
    "RuleStore",
    "db_path",
    "validate",
]
