"""The one exception type for mistakes a user can make (bad flags, missing folders, offline downloads)."""


class UsageError(Exception):
    """A problem the user can fix: the CLI prints it as one line and exits with status 2, no traceback."""
