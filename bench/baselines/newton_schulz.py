"""Muon's published Newton–Schulz iteration (Keller Jordan, Muon, `zeropower_via_newtonschulz5`),
written in plain PyTorch: normalize by the Frobenius norm + 1e-7, transpose tall inputs,
then `A = X X^T; B = b A + c A^2; X = a X + B X` with (a, b, c) = (3.4445, -4.7750, 2.0315).
Here in the input's dtype (Muon itself casts to bfloat16) so both sides compute alike."""

MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def muon_newton_schulz(G, steps=5, coefficients=None):
    """coefficients: None for Muon's triple every step, or a list of (a, b, c) per step."""
    schedule = coefficients or [MUON_COEFFICIENTS] * steps
    X = G
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in schedule[:steps]:
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X
