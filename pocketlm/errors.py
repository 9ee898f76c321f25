"""The one exception type for a user's mistake: the CLI prints its message as one line, no traceback."""


class PocketLMError(Exception):
    """A problem the user can fix: a wrong name, a bad file, an over-long prompt. The message says how."""
