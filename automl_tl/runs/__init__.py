"""The run directory and where it lives: local folders or object storage."""
