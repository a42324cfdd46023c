"""Compression methods: pure math (merge.py) and small dataclasses that attach to a stock model."""
