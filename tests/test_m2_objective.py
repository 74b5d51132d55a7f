r"""M2's step objective :meth:`~ppl_vae.kinds.m2.M2Kind.loss` against a computation by hand.

The kind's docstring defines the step loss of a shard as

.. math:: J = \frac{w_l}{B_l} \sum_{i \in l} -\mathcal{L}(x_i, y_i)
    + \frac{\alpha}{B_l} \sum_{i \in l} -\log q_\phi(y_i \mid x_i)
    + \frac{w_u}{B_u} \sum_{i \in u} -\mathcal{U}(x_i),
    \qquad w_l = \frac{N_l}{N},\ w_u = \frac{N_u}{N}.

Here every term is recomputed from the components' log densities (``torch.distributions``
and the networks' outputs; no Pyro ELBO, no poutine): :math:`\mathcal{L}` with the same ``z``
draw as the kind's ``Trace_ELBO`` (same seed), :math:`\mathcal{U}` as the exact sum over the
classes with one ``z`` per class (what ``TraceEnum_ELBO`` computes with the guide's ``y``
enumerated), and :math:`\log q_\phi(y \mid x)` as the ``log_softmax`` of the classifier's logits.
The labelled and unlabelled weights differ (:math:`N_l \ne N_u`), ``alpha`` is not 1 and the
batch sizes :math:`B_l, B_u` are those of a global batch twice the shard's, so swapping the
weights, dropping ``alpha``, flipping the classification term's sign or dividing by the shard's
size instead of the global batch's each changes :math:`J` by nats. Float64 throughout: value and
gradients must agree to 1e-9 relative (the two computations differ only by the order of
floating-point sums, ~1e-15 relative).
"""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch
import torch.nn.functional as F

from ppl_vae.data import load_data
from ppl_vae.kinds.m2 import M2Kind
from ppl_vae.ssl import SSLConfig, build_ssvae

K = 3  # classes
D = 4  # pixels
N_L, N_U = 6, 18  # labelled and unlabelled training points: w_l = 0.25, w_u = 0.75
ALPHA = 2.5
RTOL = 1e-9


def _kind(alpha: float = ALPHA, prior: str = "gaussian") -> M2Kind:
    torch.manual_seed(0)
    model = build_ssvae(
        (D,), K, prior=prior, likelihood="bernoulli", label_guide="enumerate", latent_dim=2,
        hidden_dims=(8,), prior_args={"learn_scale": True} if prior != "gaussian" else None,
    ).double()  # fmt: skip
    with torch.no_grad():  # a classifier far from uniform, so that the y terms matter
        for p in model.label_guide.net.parameters():
            p.mul_(3.0)
        if model.prior.label_conditional:  # class locations and scales far apart
            model.prior.loc.copy_(torch.randn(K, 2, dtype=torch.float64) * 1.5)
            model.prior.scale.copy_(torch.rand(K, 2, dtype=torch.float64) + 0.5)
    rng = np.random.default_rng(0)
    n = N_L + N_U
    x = rng.integers(0, 2, size=(n + 6, D)).astype(np.float32)
    y = np.arange(n + 6) % K
    ds = load_data(x, labels=y, val_fraction=0.0, test_fraction=6 / (n + 6), seed=0)
    cfg = SSLConfig(labels=N_L, alpha=alpha, num_classes=K, likelihood="bernoulli",
                    latent_dim=2, hidden_dims=[8], device="cpu")  # fmt: skip
    train = ds.train_x.double()
    assert len(train) == n, len(train)
    labelled = np.arange(N_L)
    unlabelled = np.arange(N_L, n)
    splits = (train, ds.val_x.double(), ds.test_x.double())
    return M2Kind(model, cfg, ds, splits, labelled, unlabelled, False, torch.device("cpu"))


def _batches(kind: M2Kind) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # A shard of 4 labelled and 8 unlabelled points, of global batches of 8 and 16.
    return kind.x_l[:4], kind.y_l[:4], kind.x_u[:8]


def _log_pz(model, z, y):
    r""":math:`\log p(z)` (standard normal) or, for the class-conditional prior, :math:`\log
    \mathcal{N}(z; \mu_y, \sigma_y^2)` with the class's row of the parameters picked by index;
    ``y`` holds class indices broadcasting against ``z``'s batch."""
    if not model.prior.label_conditional:
        return torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    loc, scale = model.prior.loc[y], model.prior.scale[y]
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * np.log(2 * np.pi)).sum(-1)


def _labelled_elbo(model, x, y, seed):
    r""":math:`\log p(x|y,z) + \log p(y) + \log p(z) - \log q(z|x,y)`, one z per point."""
    onehot = F.one_hot(y, K).double()
    pyro.set_rng_seed(seed)  # the kind's Trace_ELBO draws z from this state, first
    q = model.q_z(x, onehot)
    z = q.rsample()
    log_py = model.class_logits.log_softmax(-1)[y]
    log_pz = _log_pz(model, z, y)
    logits = model.decoder(model.prior.embed(z), onehot).reshape(len(x), D)
    log_px = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
    log_qz = torch.distributions.Normal(q.base_dist.loc, q.base_dist.scale).log_prob(z).sum(-1)
    return log_px + log_py + log_pz - log_qz


def _unlabelled_elbo(model, x):
    r""":math:`\mathcal{U}(x) = \sum_k q(k|x) [\log p(x|k,z_k) + \log p(k) + \log p(z_k)
    - \log q(z_k|x,k) - \log q(k|x)]`, one :math:`z_k` per class and point, drawn from the RNG's
    current state."""
    n = len(x)
    eye = torch.eye(K, dtype=x.dtype)[:, None, :]  # (K, 1, K): every class
    q = model.q_z(x, eye)  # batch (K, N)
    z = q.rsample()  # (K, N, 2)
    log_pk = model.class_logits.log_softmax(-1)[:, None]  # (K, 1)
    log_pz = _log_pz(model, z, torch.arange(K)[:, None])
    logits = model.decoder(model.prior.embed(z), eye.expand(K, n, K)).reshape(K, n, D)
    log_px = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
    log_qz = torch.distributions.Normal(q.base_dist.loc, q.base_dist.scale).log_prob(z).sum(-1)
    log_qk = model.label_guide(x).log_softmax(-1).T  # (K, N)
    return (log_qk.exp() * (log_px + log_pk + log_pz - log_qz - log_qk)).sum(0)


def _by_hand(kind: M2Kind, x_l, y_l, x_u, b_l, b_u, seed, alpha=ALPHA):
    model = kind.model
    n = N_L + N_U
    w_l, w_u = N_L / n, N_U / n
    elbo_l = _labelled_elbo(model, x_l, y_l, seed)
    log_q_y = model.label_guide(x_l).log_softmax(-1).gather(1, y_l[:, None]).squeeze(1)
    # the kind evaluates the unlabelled term after the labelled one: the RNG is where the
    # labelled draw left it
    elbo_u = _unlabelled_elbo(model, x_u)
    j = (w_l / b_l) * (-elbo_l).sum() + (alpha / b_l) * (-log_q_y).sum()
    neg = (-elbo_l.sum(), -elbo_u.sum(), -log_q_y.sum())
    return j + (w_u / b_u) * (-elbo_u).sum(), tuple(t.detach() for t in neg)


def _grads(module: torch.nn.Module, value: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in module.parameters() if p.requires_grad]
    return list(torch.autograd.grad(value, params, allow_unused=True))


def test_weights_are_the_labelled_and_unlabelled_fractions():
    kind = _kind()
    assert (kind.w_l, kind.w_u) == (N_L / (N_L + N_U), N_U / (N_L + N_U)) == (0.25, 0.75)


@pytest.mark.parametrize("prior", ["gaussian", "class-conditional"])
@pytest.mark.parametrize("seed", [1, 2])
def test_step_loss_value_and_gradient_equal_the_hand_computation(seed, prior):
    """With p(z | y) the labelled term scores z against its class's prior and the enumerated
    unlabelled term against every class's in turn."""
    kind = _kind(prior=prior)
    x_l, y_l, x_u = _batches(kind)
    b_l, b_u = 2 * len(x_l), 2 * len(x_u)  # global batches of a two-rank run
    pyro.set_rng_seed(seed)
    loss = kind.loss(x_l, y_l, x_u, b_l, b_u)
    hand, (neg_l, neg_u, neg_c) = _by_hand(kind, x_l, y_l, x_u, b_l, b_u, seed)
    # the history's parts are the unweighted terms, each divided by its global batch
    parts = kind.parts
    torch.testing.assert_close(parts[0], neg_l.detach() / b_l, rtol=RTOL, atol=0)
    torch.testing.assert_close(parts[1], neg_u.detach() / b_u, rtol=RTOL, atol=0)
    torch.testing.assert_close(parts[2], neg_c.detach() / b_l, rtol=RTOL, atol=0)
    torch.testing.assert_close(loss, hand, rtol=RTOL, atol=0)
    # The mutants' J differ from the true one by far more than the tolerance (0.25, 1.1 and
    # 3.8 nats here, against |J| ~ 3.5): a wrong weight cannot hide in it.
    a, b, c = float(neg_l) / b_l, float(neg_u) / b_u, float(neg_c) / b_l
    mutants = {
        "weights swapped": 0.75 * a + 0.25 * b + ALPHA * c,
        "alpha dropped": 0.25 * a + 0.75 * b + c,
        "classification sign flipped": 0.25 * a + 0.75 * b - ALPHA * c,
        "divided by the shard's size": 0.25 * 2 * a + 0.75 * 2 * b + ALPHA * 2 * c,
    }
    for name, value in mutants.items():
        assert abs(value - float(hand.detach())) > 0.1, name
    for g_kind, g_hand in zip(_grads(kind.model, loss), _grads(kind.model, hand), strict=True):
        if g_hand is None:
            assert g_kind is None or not g_kind.any()
        else:
            torch.testing.assert_close(g_kind, g_hand, rtol=1e-7, atol=1e-12)


def test_classification_term_pulls_q_towards_the_observed_labels():
    r"""Alone (labelled term and unlabelled term set aside), one gradient step on :math:`J` must
    raise :math:`\log q_\phi(y \mid x)` of the labelled points: a sign error makes it fall.

    The classification term's gradient w.r.t. the classifier's last bias is known in closed form:
    :math:`\frac{\alpha}{B_l} \sum_i (\mathrm{softmax}(f(x_i)) - e_{y_i})`.
    """
    kind, kind_no_class = _kind(), _kind(alpha=0.0)  # the same initial weights
    x_l, y_l, _ = _batches(kind)
    b_l = len(x_l)
    bias = kind.model.label_guide.net.net[-1].bias
    bias0 = kind_no_class.model.label_guide.net.net[-1].bias
    (g_a,) = torch.autograd.grad(kind.loss(x_l, y_l, x_l[:0], b_l, 1), [bias])
    (g_0,) = torch.autograd.grad(kind_no_class.loss(x_l, y_l, x_l[:0], b_l, 1), [bias0])
    probs = kind.model.label_guide(x_l).softmax(-1).detach()
    closed = ALPHA / b_l * (probs - F.one_hot(y_l, K).double()).sum(0)
    # The labelled ELBO does not involve q(y|x): its gradient at this bias is zero, so the whole
    # gradient is the classification term's.
    torch.testing.assert_close(g_0, torch.zeros_like(g_0), rtol=0, atol=1e-12)
    torch.testing.assert_close(g_a, closed, rtol=1e-9, atol=1e-12)
    # and a small step down the gradient raises the labelled log q(y|x)
    with torch.no_grad():
        before = kind.model.label_guide(x_l).log_softmax(-1).gather(1, y_l[:, None]).sum()
        bias -= 0.1 * g_a
        after = kind.model.label_guide(x_l).log_softmax(-1).gather(1, y_l[:, None]).sum()
    assert float(after) > float(before) + 1e-3


def test_classification_loss_is_minus_the_log_softmax_of_the_logits():
    kind = _kind()
    x_l, y_l, _ = _batches(kind)
    logits = kind.model.label_guide(x_l)
    expected = -(logits - torch.logsumexp(logits, -1, keepdim=True)).gather(1, y_l[:, None])
    torch.testing.assert_close(
        kind.model.classification_loss(x_l, y_l), expected.squeeze(1), rtol=1e-12, atol=0
    )
    assert bool((kind.model.classification_loss(x_l, y_l) > 0).all())  # -log of a probability
