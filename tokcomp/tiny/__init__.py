"""tokcomp-tiny: a small LLaVA-OneVision trained from scratch on the built-in task suites.

The suites themselves (``tokcomp.data.tasks``) belong to the library; this package is only the
model: ``model`` builds it untrained, ``train`` trains it (resumably), ``evaluate`` measures it
through the pipeline and ``card`` writes its training curve and model card. Nothing in the library
imports it; the CLI's ``train-tiny`` does.
"""

from tokcomp.data.tasks import TASKS

__all__ = ["TASKS"]
