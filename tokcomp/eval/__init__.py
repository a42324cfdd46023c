"""Evaluation through lmms-eval: a tokcomp model class, the built-in task suites, and the runner.

``model`` is the lmms-eval model (any tokcomp method on any supported VLM), ``suites`` the hooks of
the tc_* task YAMLs in ``tasks/``, ``tasks`` how task names and ``--data-files`` become task
configs, and ``runner`` runs ``simple_evaluate`` and writes ``results.json`` and ``samples.jsonl``.
"""
