"""The two kinds of failure a user can see, each with its exit code (SPEC.md "Commands")."""


class LlmtapError(Exception):
    """A failure with a one-line, user-facing message. Never carries a secret."""

    exit_code = 1


class UsageError(LlmtapError):
    """Bad usage or bad configuration: exit 2, the message names the key or flag."""

    exit_code = 2


class RuntimeFailure(LlmtapError):
    """Something on the machine went wrong at run time: exit 1."""

    exit_code = 1
