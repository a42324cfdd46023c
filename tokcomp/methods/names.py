"""The registry's method names, importable without torch (for the CLI's help); a test keeps them equal."""

METHOD_NAMES = (
    "none", "dymu", "dtome", "tome", "dycoke", "adaptive", "fastv", "dart", "pyramiddrop", "random", "divprune",
    "cdpruner", "visionzip", "prumerge", "vidcom2", "fastvid", "holitom",
)  # fmt: skip
