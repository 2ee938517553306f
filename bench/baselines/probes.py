"""Probe generation as the anchors write it: lives in curvkit.testing.anchors."""
from curvkit.testing.anchors import numpy_probes, torch_probes

__all__ = ["numpy_probes", "torch_probes"]
