"""The one exception type users see.

Every error a user can cause (bad names, missing files, mismatched stores, bad numbers) is raised
as :class:`CrosslayerError` with a one-line message that names the problem and the fix. The CLI
prints it as ``error: <message>`` and exits with status 2; library callers can catch it.
"""


class CrosslayerError(Exception):
    """A user-facing error with a one-line message naming the problem and the fix."""
