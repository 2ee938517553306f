"""Muon's Newton-Schulz iteration: the anchor lives in curvkit.testing.anchors (one copy, shared
with ``python -m curvkit.bench``)."""
from curvkit.testing.anchors import MUON_COEFFICIENTS, muon_newton_schulz

__all__ = ["MUON_COEFFICIENTS", "muon_newton_schulz"]
