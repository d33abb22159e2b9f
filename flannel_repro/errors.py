"""The one exception type the CLI turns into a single line on stderr.

Raise `FlannelError` for anything a user can fix (a missing file, a bad key in params.yaml, a tokenizer of the
wrong size): the message names the file or key and says how to fix it. Everything else is a bug and keeps its
traceback.
"""


class FlannelError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""

    exit_code = 2


class ConfigError(FlannelError):
    """params.yaml (or an override) is not a valid configuration."""
