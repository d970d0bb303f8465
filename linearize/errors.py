"""One error type for everything a user can get wrong; the CLI prints it as one line."""


class LinearizeError(Exception):
    """Bad input or state the user can fix. The message names the problem and the fix."""
