"""experimental operators (being written)."""
