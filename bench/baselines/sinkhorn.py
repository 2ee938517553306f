"""Entropic OT: POT's solvers as anchors (curvkit.testing.anchors) and the benchmark problems
of the SNS paper and RegOT (curvkit.testing)."""
from curvkit.testing import marginal_error, ot_assignment, ot_grid
from curvkit.testing.anchors import pot_batch, pot_sinkhorn

__all__ = ["marginal_error", "ot_assignment", "ot_grid", "pot_batch", "pot_sinkhorn"]
