"""One exception type for everything a user can fix; the CLI prints it as one line and exits 2."""


class LigoError(Exception):
    """A user error: bad input, a missing file, an impossible request.  The message names the file or tensor and
    says what to do."""


class UnknownFamily(LigoError):
    """No descriptor reads this checkpoint.  Carries its config and tensor names, so ``inspect`` can say which
    family comes closest and what a new descriptor would have to map."""

    def __init__(self, message: str, config: dict, keys: list[str]):
        super().__init__(message)
        self.config, self.keys = config, keys
