"""``llip compare``: models and ablations trained side by side over seeds, with their statistics and probes."""

from .study import compare, summarize

__all__ = ["compare", "summarize"]
