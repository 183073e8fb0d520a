"""The one exception type the command line turns into a one-line message."""


class AucliError(Exception):
    """A user-facing failure: bad input, missing checkpoint, unreadable data.

    The command line prints ``str(error)`` on one line and exits non-zero,
    without a traceback. Messages should name the input and the reason.
    """

    exit_code = 1
    label = "error"  # the word after "aucli: " on the message line


class UsageError(AucliError):
    """Wrong or missing options, or a missing checkpoint: exit status 2."""

    exit_code = 2


class Interrupted(AucliError):
    """Ctrl-C: the message says what was interrupted and what was kept. Exit status
    130, as shells report a process ended by SIGINT."""

    exit_code = 130
    label = "interrupted"
