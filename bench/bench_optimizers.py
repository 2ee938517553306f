"""One optimizer step of the reference optimizers (examples/optimizers.py) against the same
optimizer with the anchors' linear algebra in plain PyTorch (bench/baselines/optimizers.py):
Muon's NS5, Distributed Shampoo's eigh roots, SOAP's QR refresh, AdaHessian's per-tensor loop. The model is the MLP
784-256-256-10 of the issue that asked for it, float32, one batch of 256; each timed call is a
forward, a backward and the step, so the ratio is what a training loop sees.
Run: python -m pytest bench/bench_optimizers.py --benchmark-only
"""
import pytest
from _in_turn import in_turn

torch = pytest.importorskip("torch")
from baselines.optimizers import SOAPQR, AdaHessianLoop, MuonNS5, ShampooEigh  # noqa: E402
from optimizers import SOAP, AdaHessian, Muon, Shampoo  # noqa: E402

# Shampoo and SOAP refresh their preconditioners every step here: the refresh is the linear
# algebra being compared (their default every-10-steps cost is a tenth of it per step).
OPTIMIZERS = {
    "muon": {"curvkit": lambda ps: Muon(ps), "torch NS5": lambda ps: MuonNS5(ps)},
    "shampoo": {"curvkit": lambda ps: Shampoo(ps, precondition_frequency=1),
                "torch eigh": lambda ps: ShampooEigh(ps, precondition_frequency=1)},
    "soap": {"curvkit": lambda ps: SOAP(ps, precondition_frequency=1),
             "torch QR": lambda ps: SOAPQR(ps, precondition_frequency=1)},
    "adahessian": {"curvkit": lambda ps: AdaHessian(ps), "torch loop": lambda ps: AdaHessianLoop(ps)},
}
CASES = [(name, impl) for name, impls in OPTIMIZERS.items() for impl in impls]


def training_step(make_optimizer):
    torch.manual_seed(0)
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    optimizer = make_optimizer([p for p in model.parameters() if p.ndim == 2])
    second_order = isinstance(optimizer, AdaHessian)  # its step needs the gradient's graph

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward(create_graph=second_order)
        optimizer.step()

    for _ in range(3):  # past SOAP's first (set-up) step and every lazy initialization
        step()
    return step


@pytest.mark.parametrize("name, impl", CASES, ids=[f"{n}-{i.split()[0]}" for n, i in CASES])
def test_step(benchmark, name, impl):
    benchmark.group = f"optimizer-step-{name}-mlp784"
    benchmark.extra_info.update(impl=impl)
    benchmark(training_step(OPTIMIZERS[name][impl]))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_in_turn(benchmark, name):
    """Both steps of one optimizer in turn (_in_turn.py), 60 rounds."""
    benchmark.group = f"optimizer-in-turn-{name}"
    in_turn(benchmark, {impl: training_step(make) for impl, make in OPTIMIZERS[name].items()}, rounds=60)
