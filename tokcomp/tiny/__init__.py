"""tokcomp-tiny: a small LLaVA-OneVision trained from scratch on built-in synthetic task suites.

``tasks`` generates the suites (tc_shapes, tc_text, tc_multi, tc_motion), ``model`` builds the
untrained model, ``train`` trains it and ``evaluate`` measures its accuracy through the pipeline.
"""

TASKS = ("tc_shapes", "tc_text", "tc_multi", "tc_motion")
