"""The programs in examples/ run and do what they say."""
import runpy
from pathlib import Path

from conftest import needs_torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@needs_torch
def test_mfac_training_run():
    results = runpy.run_path(str(EXAMPLES / "mfac_train.py"))["main"]()
    mfac, sgd = results["mfac"], results["sgd"]
    assert all(l == l for l in mfac)  # no NaN  # noqa: E741
    assert mfac[-1] < 0.7 * mfac[0]
    assert mfac[-1] < sgd[-1]  # the preconditioner helps on this problem
