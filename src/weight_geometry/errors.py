"""User-facing errors: bad input is reported as one line, never as a traceback."""


class UserError(Exception):
    """A problem with the user's input (config value, checkpoint file, tensor).

    The message is one line that names the offending key, file or tensor, the value found and
    what is allowed. Rule scripts and the Snakefile print it as is and exit non-zero.
    """


def listed(items, most: int = 8) -> str:
    """The items a message names, as text: ``a, b, c``, or the first ``most`` and ``and N
    more`` (``a, b, ... h and 4 more``)."""
    items = [str(item) for item in items]
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more
