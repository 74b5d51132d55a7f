"""The families' lean bijections (``lean_bijection``) are ``biject_to``'s, bit for bit.

``biject_to(positive)`` ends in a unit affine step (``0 + 1 * x``) that the families drop to
save two kernels forward and two backward per parameter block. Tolerance: none; values and
gradients are compared with ``torch.equal`` against ``biject_to`` itself, for every constraint
a shipped family's parameters take plus shifted and bounded ones that keep a real affine step.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributions import biject_to, constraints
from torch.distributions.transforms import AffineTransform, ComposeTransform, ExpTransform

from ppl_vae.models.distributions.family import MirrorFamily, lean_bijection
from ppl_vae.models.distributions.normal import Normal

CONSTRAINTS = [
    constraints.real,
    constraints.positive,
    constraints.unit_interval,
    constraints.greater_than(2.0),
    constraints.interval(-3.0, 3.0),
    constraints.greater_than_eq(0.0),
]


@pytest.mark.parametrize("c", CONSTRAINTS, ids=str)
def test_lean_bijection_is_biject_to_bitwise(c) -> None:
    raw = torch.linspace(-20.0, 20.0, 401, dtype=torch.float32).requires_grad_()
    lean, ref = lean_bijection(c)(raw), biject_to(c)(raw)
    assert torch.equal(lean, ref)
    w = torch.randn(raw.shape, generator=torch.Generator().manual_seed(0))
    (g_lean,) = torch.autograd.grad((lean * w).sum(), raw)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), raw)
    assert torch.equal(g_lean, g_ref)


def test_the_unit_affine_step_is_dropped_and_a_real_one_kept() -> None:
    assert isinstance(lean_bijection(constraints.positive), ExpTransform)
    shifted = lean_bijection(constraints.greater_than(2.0))
    assert isinstance(shifted, ComposeTransform)
    assert any(isinstance(p, AffineTransform) for p in shifted.parts)


def test_the_normal_family_builds_its_scale_with_one_exp() -> None:
    family = MirrorFamily(Normal)
    raw = torch.randn(4, 6)
    params = family.constrain(raw, 3)
    assert torch.equal(params["scale"], raw[:, 3:].exp())
    assert torch.equal(params["loc"], raw[:, :3])
