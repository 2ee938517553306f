"""The anchors of the Hutchinson estimators and optimizer steps (AdaHessian, Sophia, XTrace,
PyHessian's trace loop): they live in curvkit.testing.anchors."""
from curvkit.testing.anchors import (
    adahessian_step_torch,
    hutchinson_layer_traces_loop,
    resnet18_cifar_shapes,
    sophia_step_torch,
    xtrace_per_probe,
)

__all__ = ["adahessian_step_torch", "hutchinson_layer_traces_loop", "resnet18_cifar_shapes", "sophia_step_torch",
           "xtrace_per_probe"]
