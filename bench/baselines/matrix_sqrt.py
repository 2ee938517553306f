"""Matrix square roots by eigh: the anchor lives in curvkit.testing.anchors."""
from curvkit.testing.anchors import eigh_sqrt

__all__ = ["eigh_sqrt"]
