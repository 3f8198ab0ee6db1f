"""The one exception type that reaches a user as a single readable line (exit status 2)."""


class UserInputError(ValueError):
    """Bad input from a user: an unknown name, a value out of range, a missing or malformed file.

    The message must be one line that names the offending value and says what is allowed.
    The command-line layer prints it without a traceback and exits with status 2.
    """
