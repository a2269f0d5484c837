"""The errors a user can cause: one base class carrying the command's exit code."""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_FAILED = 1  # the run broke off (nothing committed), or a query / cluster call failed
EXIT_BAD_SPEC = 2  # the spec, its model or its inputs are wrong; nothing was committed
EXIT_CLUSTER_TOO_SMALL = 3  # the actor pool cannot be scheduled; no work was done
EXIT_TOO_MANY_ERRORS = 4  # committed, but more error rows than --max-error-ratio allows
EXIT_BELOW_THRESHOLD = 5  # evaluated, but a metric fell below the spec's evaluate.min
EXIT_DRIFT = (
    6  # report / backfill --check: a run's figures moved past the spec's monitor thresholds
)
EXIT_NOT_SCORED = 7  # committed, but the spec's evaluate: could not score it (its hold-out)
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): nothing committed; a rerun resumes what was durable
EXIT_TERMINATED = 143  # SIGTERM (a scheduler's stop, `timeout`), 128 + 15: as Ctrl-C otherwise


class VisionOpsError(Exception):
    """An error the CLI reports as `error: <message>` and exits with `exit_code` (no traceback).

    Subclasses set `exit_code`; most also derive from the built-in they refine (ValueError,
    LookupError, RuntimeError), so existing `except` clauses keep catching them.
    """

    exit_code = EXIT_FAILED


class UnknownTask(VisionOpsError, KeyError):
    """A task name no record is registered for (a spec, a manifest, a table's metadata)."""

    exit_code = EXIT_BAD_SPEC

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelError(VisionOpsError, ValueError):
    """A model the spec names that cannot be built or loaded; says what was expected."""

    exit_code = EXIT_BAD_SPEC


class FailedInTheDriver(RuntimeError):
    """Work in one of the driver's threads failed: its error in one line, `Type: message` (the
    error itself is the cause); `what` says which work, as the command line words it."""

    what = "work failed in the driver"

    @classmethod
    def of(cls, err: BaseException) -> FailedInTheDriver:
        return cls(in_one_line(err))


class PredictorFailed(FailedInTheDriver):
    """A predictor in one of the driver's threads failed (`runtime.predict_in: driver`)."""

    what = "the predictor failed in the driver"


class ReadFailed(FailedInTheDriver):
    """A read in one of the driver's threads failed (`runtime.runner: in_process`) with an
    error that is not one input's (an input that cannot be read is an error row)."""

    what = "a read failed in the driver"


def in_one_line(err: BaseException) -> str:
    """`Type: first line` of an error (its type alone where it has no message): what a
    command says of an error that is not its own, the rest of it left to the logs."""
    lines = str(err).splitlines()
    name = type(err).__name__
    return f"{name}: {lines[0]}" if lines else name


class Terminated(KeyboardInterrupt):
    """A SIGTERM, raised in the main thread as Ctrl-C's KeyboardInterrupt is, so a run stops
    the same way: its durable rows kept to resume, what its commit left said."""


def stopped_by_sigterm(err: BaseException) -> bool:
    """Whether a SIGTERM stopped the command: `err` is Terminated, or was raised handling one
    (InterruptedDuringCommit raised `from None` keeps it as its context)."""
    return isinstance(err, Terminated) or isinstance(err.__context__, Terminated)


class InterruptedDuringCommit(KeyboardInterrupt):
    """A Ctrl-C (SIGINT) while the commit was with the catalog: whether it landed is unknown."""


# The last line of the traceback Ray passes on for an actor that failed as it started.
ACTOR_ERROR_LINE = re.compile(r"^vision_ops\.errors\.(\w+): (.+)$", re.MULTILINE)


def raised_as_an_actor_started(err: BaseException) -> tuple[str, int] | None:
    """The message and exit code of the error a Ray actor raised in its `__init__` (a model
    file that does not load): Ray passes on only the text of its traceback, in an actor error
    somewhere in `err`'s chain. A vision-ops error keeps its exit code; any other is `Type:
    first line`, EXIT_FAILED. None where the chain holds no actor error with a traceback (an
    actor killed from outside, its node lost)."""
    from ray.exceptions import RayActorError

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, RayActorError):
            for name, message in reversed(ACTOR_ERROR_LINE.findall(str(seen))):
                kind = globals().get(name)
                if isinstance(kind, type) and issubclass(kind, VisionOpsError):
                    return message, kind.exit_code
            if FRAME in str(seen):
                line = raised_last(str(seen))
                return (line, EXIT_FAILED) if line else None
        seen = seen.__cause__ or seen.__context__
    return None


# The line Python's traceback text puts between an error and the one raised from it.
RAISED_FROM = "\nThe above exception was the direct cause of the following exception:"
FRAME = '  File "'  # a traceback's line naming a frame
RAY_DATA_WRAPPER = "UserCodeException"  # what Ray Data raises from a UDF's error


def raised_in_a_worker(err: BaseException) -> str | None:
    """`Type: first line` of the error user code raised in a Ray task or actor method (a model
    failing on the device, a decoder a worker lacks), where `err` is Ray's error for it: Ray
    passes that error on only as the text of its traceback, the error raised last in its last
    block (Ray Data's wrapper raised from it comes after it). None where `err` is not Ray's
    task error."""
    from ray.exceptions import RayTaskError

    if not isinstance(err, RayTaskError):
        return None
    return raised_last(str(err))


def raised_last(traceback: str) -> str | None:
    """`Type: first line` of the error raised last in a traceback's text (not Ray Data's
    wrapper raised from it)."""
    blocks = traceback.split(RAISED_FROM)
    if len(blocks) > 1 and RAY_DATA_WRAPPER in blocks[-1]:
        blocks.pop()
    return _error_line(blocks[-1].splitlines())


def _error_line(lines: list[str]) -> str | None:
    """The error line of one traceback block: the first unindented line after its last frame
    (the error's message may go on over more lines); without frames (Ray hides its own), the
    last unindented line."""
    frames = [index for index, line in enumerate(lines) if line.startswith(FRAME)]
    unindented = [line for line in lines[frames[-1] + 1 if frames else 0 :] if line.strip()]
    unindented = [line for line in unindented if not line[0].isspace()]
    if not unindented:
        return None
    return unindented[0] if frames else unindented[-1]
