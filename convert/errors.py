"""The one error type the converter reports to users: a one-line message, exit code 2."""


class ConversionError(Exception):
    """A refused conversion. The message names the input, the value and what is allowed."""
