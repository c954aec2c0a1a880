"""resize operators (being written)."""
