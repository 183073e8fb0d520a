"""The one exception type the command line turns into a one-line message."""


class AucliError(Exception):
    """A user-facing failure: bad input, missing checkpoint, unreadable data.

    The command line prints ``str(error)`` on one line and exits non-zero,
    without a traceback. Messages should name the input and the reason.
    """

    exit_code = 1


class UsageError(AucliError):
    """Wrong or missing options, or a missing checkpoint: exit status 2."""

    exit_code = 2
