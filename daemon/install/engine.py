"""The install engine: steps applied in order, idempotent, rolled back on failure, removed by tag.

The discipline is wg-quick's: every change is a Step that knows whether it is needed (a second run
changes nothing and says so), makes its change and can undo it. When a step fails, the steps done
in this run are undone in reverse order (the failed one too: it may have half-happened) and the
message names the failed step. Uninstall is a list of Removals, each tagged like the steps whose
effect it removes (Step.tag; `unremoved` names any step no removal covers); removals look at the
machine (and the manifest), never at this run, so they also clean a half-installed machine, and
they keep going past a failure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from llmtap.errors import LlmtapError, RuntimeFailure

if TYPE_CHECKING:
    from llmtap.install.manifest import Manifest

Report = Callable[[str], None]
DATA_STEPS = ("certificate authority", "install record")  # in state_dir: --purge's data removes them


@dataclass
class Step:
    name: str  # in messages: "OS trust (debian)"
    needed: Callable[[], bool]
    apply: Callable[[], str]  # returns what it did, one line
    undo: Callable[[], None]  # this run's change only: the rollback
    tag: str = ""  # what it puts on the machine, as its Removal is tagged: "OS trust" (default: name)

    def __post_init__(self) -> None:
        self.tag = self.tag or self.name


@dataclass(frozen=True)
class Removal:
    tag: str  # the steps it removes the effect of, on any machine, installed by any run
    remove: Callable[[], str | None]  # what it removed, or None when there was nothing
    also: tuple[str, ...] = ()  # more step tags it removes (--purge's data: the CA, the record)


def unremoved(steps: list[Step], removals: list[Removal]) -> list[str]:
    """The tags of steps that no removal takes away: none, for a provider's steps and its
    uninstall --purge (each provider's tests check it)."""
    covered = {removal.tag for removal in removals} | {t for r in removals for t in r.also}
    return [step.tag for step in steps if step.tag not in covered]


class Provider(Protocol):
    """What an OS provides: `llmtap install`, `uninstall` and `ca rotate` on it."""

    def install(self, trust: bool = True, service: bool = True) -> list[str]: ...

    def uninstall(self, purge: bool = False) -> list[str]: ...

    def rotate(self) -> None: ...


def run_steps(steps: list[Step], report: Report, after_each: Callable[[Step], None] | None = None
              ) -> list[Step]:
    """Runs the needed steps; on a failure undoes them (the failed one too) in reverse order."""
    done: list[Step] = []
    for step in steps:
        if not step.needed():
            continue
        try:
            report(step.apply())
            done.append(step)
            if after_each:
                after_each(step)
        except Exception as exc:  # a bug must roll back too
            problems = rollback([*done, step])
            outcome = (f"rolled back {len(done)} step(s), the machine is as before" if not problems
                       else "rollback incomplete: " + "; ".join(problems))
            raise RuntimeFailure(f"step {step.name!r} failed: {describe(exc)}; {outcome}") from None
    return done


def run_recorded(steps: list[Step], manifest: Manifest, report: Report) -> list[Step]:
    """run_steps, saving the manifest after each step (an interrupted install can still be
    undone) and putting it back as it was after a rollback."""
    try:
        return run_steps(steps, report, after_each=lambda step: manifest.save_if_possible())
    except RuntimeFailure:
        manifest.restore()
        raise


def describe(exc: BaseException) -> str:
    if isinstance(exc, LlmtapError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return f"{type(exc).__name__}: {exc}"


def rollback(steps: list[Step]) -> list[str]:
    problems = []
    for step in reversed(steps):
        try:
            step.undo()
        except Exception as exc:
            problems.append(f"could not undo {step.name!r}: {describe(exc)}")
    return problems


def run_removals(removals: list[Removal], report: Report, kept: tuple[Path, Path] | None,
                 purge_command: str) -> list[str]:
    """Runs every removal, keeps going past failures, then says what was kept or went wrong.
    `kept`: the state and records directories, when they are left in place."""
    done, problems = [], []
    for removal in removals:
        try:
            if message := removal.remove():
                done.append(message)
                report(message)
        except (LlmtapError, OSError) as exc:
            problems.append(f"{removal.tag}: {exc}")
    if kept is not None and kept[0].exists():
        report(f"kept {kept[0]} (CA, secrets), {kept[1]} and the config: "
               f"`{purge_command}` deletes them")
    if problems:
        raise RuntimeFailure("uninstall incomplete: " + "; ".join(problems))
    if not done:
        report("nothing to remove: llmtap is not installed")
    return done
