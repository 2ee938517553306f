"""A short training run with curvkit's M-FAC preconditioner (curvkit.torch.MFAC over a
FisherWindow of the model's flattened gradient) against plain SGD, on a synthetic
classification task. Run: python examples/mfac_train.py (tests/test_examples.py runs it)."""
import torch

import curvkit.torch as ct


def data(n=512, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 10, generator=gen)
    w = torch.randn(10, 3, generator=gen)
    y = (X @ w + 0.3 * torch.randn(n, 3, generator=gen)).argmax(dim=1)
    return X, y


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))


def train(optimizer_name, steps=60, batch=64):
    X, y = data()
    net = model()
    if optimizer_name == "mfac":
        opt = ct.MFAC(net.parameters(), lr=0.05, m=16, damp=1e-3, momentum=0.5)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.5)
    loss_fn = torch.nn.CrossEntropyLoss()
    losses = []
    for step in range(steps):
        i = (step * batch) % len(X)
        opt.zero_grad()
        loss = loss_fn(net(X[i:i + batch]), y[i:i + batch])
        loss.backward()
        opt.step()
        with torch.no_grad():
            losses.append(loss_fn(net(X), y).item())
    return losses


def main():
    results = {name: train(name) for name in ("mfac", "sgd")}
    for name, losses in results.items():
        print(f"{name:5s} full-batch loss: start {losses[0]:.4f}  end {losses[-1]:.4f}")
    return results


if __name__ == "__main__":
    main()
