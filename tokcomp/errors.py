"""The one exception type whose message is shown to users as a single line."""


class TokcompError(Exception):
    """A user-facing error: bad input, missing file, incompatible model or calibration."""
