"""User-facing errors: bad input is reported as one line, never as a traceback."""


class UserError(Exception):
    """A problem with the user's input (config value, checkpoint file, tensor).

    The message is one line that names the offending key, file or tensor, the value found and
    what is allowed. Rule scripts and the Snakefile print it as is and exit non-zero.
    """
