"""Serving integrations (vLLM)."""
