"""Evaluation outputs: reading run folders, the report, the regression gate, the README's results block."""
