"""M-FAC's dynamic sliding-window algorithm: the anchor lives in curvkit.testing.anchors."""
from curvkit.testing.anchors import MFACDynamic

__all__ = ["MFACDynamic"]
