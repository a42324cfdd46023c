"""Defaults shared by every command and the Python API (a light module: the CLI imports it at start)."""

DEFAULT_FRAMES = 16  # frames sampled from a video when a command is not told otherwise
DEFAULT_MAX_NEW_TOKENS = 16  # tokens generated when a command or task does not say
DTYPES = ("float32", "bfloat16", "float16")
