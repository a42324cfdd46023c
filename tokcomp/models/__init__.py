"""Model families, tiny presets and loading."""
