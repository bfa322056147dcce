"""Alias of :func:`gkpd.timing.measure_latency`, kept for code that imports it from here."""

from gkpd.timing import measure_latency

__all__ = ["measure_latency"]
