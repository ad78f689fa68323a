"""User-facing errors: one clear line, printed by the CLI without a traceback."""


class LLMSeRError(Exception):
    """A problem with the user's input (file, field, key or value) that the user can fix.

    The message is one line that names what is wrong and what to do.
    """
