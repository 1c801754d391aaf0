"""One exception type for everything a user can fix; the CLI prints it as one line and exits 2."""


class LigoError(Exception):
    """A user error: bad input, a missing file, an impossible request.  The message names the file or tensor and
    says what to do."""
