"""Image, video and multi-image sources."""
