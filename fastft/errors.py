"""The exceptions a user meets as one line: mistakes they can fix (bad flags, missing folders, offline downloads),
and a run they stopped."""
import difflib


class UsageError(Exception):
    """A problem the user can fix: the CLI prints it as one line and exits with status 2, no traceback."""


class Interrupted(Exception):
    """Ctrl-C during training; the outputs of the last finished epoch were kept. The CLI prints it as one line and
    exits with status 130."""


class InterruptedBeforeTraining(Interrupted):
    """Ctrl-C while the training images were being looked at, before anything trained (choosing the backbone,
    checking the labels); the message says what, if anything, was kept."""


def did_you_mean(given: str, choices) -> str:
    """' (did you mean X?)' for the choice closest to a mistyped `given`, or '' when none is close."""
    close = difflib.get_close_matches(given, [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]}?)" if close else ""
