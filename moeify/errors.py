"""The one exception type users see: a message that says what was wrong and what to do."""


class MoeifyError(Exception):
    """Bad input or an impossible request; the CLI prints the message (no traceback) and exits with 2."""
