"""The anchors of the Hutchinson estimators and optimizer steps, in plain PyTorch.

- AdaHessian's step (adahessian/image_classification/optim_adahessian.py, with the spatial
  averaging of its instruction/ version) and Sophia's (Sophia/sophia.py): the per-tensor
  Python loops of the published optimizers, each tensor a handful of torch kernels.
- XTrace as curvlinops' trace/epperly2024xtrace.py organizes it: one matvec per probe in a
  Python loop, then torch QR and the leave-one-out algebra (written here from Epperly, Tropp
  & Webber 2024, not copied).
- PyHessian's Hutchinson trace loop: one probe (one Hessian-vector product) per iteration.
"""
import math


def resnet18_cifar_shapes():
    """The 62 parameter tensors (11.17M entries) of a CIFAR ResNet-18 (3x3 stem, 10 classes)."""
    shapes = [(64, 3, 3, 3), (64,), (64,)]
    cin = 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            first_in = cin if block == 0 else width
            shapes += [(width, first_in, 3, 3), (width,), (width,), (width, width, 3, 3), (width,), (width,)]
            if block == 0 and (stride != 1 or cin != width):
                shapes += [(width, cin, 1, 1), (width,), (width,)]
        cin = width
    return shapes + [(10, 512), (10,)]


def adahessian_step_torch(params, grads, hessian, exp_avg, exp_avg_sq, step, lr=0.15, betas=(0.9, 0.999), eps=1e-4,
                          weight_decay=0.0, hessian_power=1.0):
    beta1, beta2 = betas
    bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
    for p, g, h, m, v in zip(params, grads, hessian, exp_avg, exp_avg_sq):
        if h.dim() <= 1:
            d = h.abs()
        elif h.dim() in (2, 3):
            d = h.abs().mean(dim=-1, keepdim=True)
        else:
            d = h.abs().mean(dim=[2, 3], keepdim=True)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(d.expand_as(v), d.expand_as(v), value=1 - beta2)
        denom = (v.sqrt() ** hessian_power) / math.sqrt(bias2) ** hessian_power + eps
        p.sub_(lr * (m / bias1 / denom + weight_decay * p))


def sophia_step_torch(params, grads, exp_avg, hessian, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1,
                      batch_size=5120, eps=1e-15):
    beta1 = betas[0]
    for p, g, m, h in zip(params, grads, exp_avg, hessian):
        p.mul_(1 - lr * weight_decay)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        ratio = (m.abs() / (rho * batch_size * h + eps)).clamp(None, 1)
        p.addcmul_(m.sign(), ratio, value=-lr)


def xtrace_per_probe(matvec_one, n, num_matvecs, generator, dtype, device="cpu"):
    """XTrace with one matvec per probe (curvlinops' loop structure) and torch linear algebra."""
    import torch

    k = num_matvecs // 2
    omega = (torch.randint(0, 2, (n, k), generator=generator, dtype=dtype, device=device) * 2 - 1)
    y = torch.stack([matvec_one(omega[:, i]) for i in range(k)], dim=1)
    q, r = torch.linalg.qr(y)
    z = torch.stack([matvec_one(q[:, i]) for i in range(k)], dim=1)
    s = torch.linalg.inv(r).T
    s = s / torch.linalg.vector_norm(s, dim=0)
    h, w, t = q.T @ z, q.T @ omega, z.T @ omega
    sw = (s * w).sum(0)
    v = w - s * sw
    estimates = (torch.trace(h) - (s * (h @ s)).sum(0) + (omega * y).sum(0) - 2 * (t * v).sum(0)
                 + (v * (h @ v)).sum(0))
    return float(estimates.mean())


def hutchinson_layer_traces_loop(loss_fn, params, num_matvecs, generator):
    """PyHessian's trace loop extended per layer: one Rademacher probe and one double-backward
    Hessian-vector product per iteration; the per-tensor v^T Hv are averaged."""
    import torch

    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    sums = [0.0] * len(params)
    for _ in range(num_matvecs):
        v = [torch.randint(0, 2, p.shape, generator=generator, dtype=p.dtype) * 2 - 1 for p in params]
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        for i, (a, b) in enumerate(zip(v, hv)):
            sums[i] += float((a * b).sum())
    return [s / num_matvecs for s in sums]
