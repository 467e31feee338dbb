"""One exception type for every problem a user can fix.

The CLI prints these as a single line (no traceback) and exits non-zero; anything else is a bug.
"""


class StarfishError(Exception):
    """A problem with the user's input, phrased as what is wrong and how to fix it."""
