"""The exception types the CLI turns into a single line on stderr.

Raise `FlannelError` for anything a user can fix (a missing file, a bad key in params.yaml, a tokenizer of the
wrong size): the message names the file or key and says how to fix it. `Interrupted` is a stop by a signal
(SIGINT, SIGTERM, SIGHUP): its message says what was written and how to go on, and the exit status is 128 + the
signal number. `TrackingIncomplete` (exit 3) says the outputs are in place but tracking could not take all of it.
`OutputFailed` (exit 4) says a command's result could not be delivered: stdout closed or full, a report not
written. Exit 0 and 1 are a verdict (`check`, `verify`, `diff`) and nothing else.
Everything else is a bug and keeps its traceback.
"""

import signal


class FlannelError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""

    exit_code = 2


class ConfigError(FlannelError):
    """params.yaml (or an override) is not a valid configuration."""


class TrackingIncomplete(FlannelError):
    """The run's outputs are written, but the tracking store did not take all of it; `result` and `run_id` are what
    the stage would have returned."""

    exit_code = 3

    def __init__(self, message: str, *, result: object, run_id: str | None) -> None:
        super().__init__(message)
        self.result, self.run_id = result, run_id


class OutputFailed(FlannelError):
    """The command ran, but its result could not be written out (stdout, a report file); not a verdict."""

    exit_code = 4


class Interrupted(KeyboardInterrupt):
    """The command was stopped by signal `signum`; a KeyboardInterrupt, so whatever cleans up after Ctrl-C runs."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or f"stopped by {signal_name(signum)}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
