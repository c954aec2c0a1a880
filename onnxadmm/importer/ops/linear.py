"""linear operators (being written)."""
