"""Integrations with engines people already run; each needs its extra (``ray``: :mod:`.ray`)."""
