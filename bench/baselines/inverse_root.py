"""Inverse p-th roots as Distributed/Scalable Shampoo compute them: the anchors live in
curvkit.testing.anchors."""
from curvkit.testing.anchors import coupled_newton_root, eigh_root, loop

__all__ = ["coupled_newton_root", "eigh_root", "loop"]
