"""User-facing errors. Owns the one exception type the CLI turns into a single `error: ...` line.

Raise `TpiError` for anything a user can fix (bad file, bad field, bad flag); the message names the
file/field and what was expected. Must not import anything heavy.
"""


class TpiError(Exception):
    """An error with a message fit to show the user as one line (no traceback)."""
