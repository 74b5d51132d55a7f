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
from ppl_vae.kinds.m2 import (
    M2Kind,
    confusion_counts,
    evaluation_metrics,
    labelled_accuracy,
    per_class_accuracy,
)
from ppl_vae.models.errors import ConfigError
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
    if seed is not None:  # (None: from the RNG's current state)
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


# -- evaluation: the per-class bounds, the unlabelled bound, log p(x), the metrics -------------
#
# Each quantity is recomputed from the model's own pieces (``q_z``, the decoder, the class
# logits, the classifier's logits) with Python loops over classes and particles, from the same
# random draws (``pyro.set_rng_seed``: the code and the hand computation draw z class by class,
# ``(S, N, D)`` at a time), or on a model whose answer is known in closed form: a decoder blind
# to z and q(z | x, y) = p(z) = N(0, I), where every importance weight is exactly
# p(k) p(x | k), whatever the draws, the number of samples, the chunks or the batches.
# Float64 throughout; the two sides differ by the order of float sums (~1e-15 relative).

CLASS_PROBS = [0.2, 0.3, 0.5]


def _ssvae(seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = build_ssvae(
        (D,), K, likelihood="bernoulli", label_guide="enumerate", latent_dim=2, hidden_dims=(8,),
        class_probs=CLASS_PROBS, **kw,
    ).double()  # fmt: skip
    with torch.no_grad():  # a classifier far from uniform, an encoder far from the prior
        for p in model.label_guide.net.parameters():
            p.mul_(3.0)
        for p in model.encoder.head.parameters():
            p.mul_(2.0)
    return model


def _points(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, D), 0.4, dtype=torch.float64), generator=g)


def _log_pk(model, k: int) -> torch.Tensor:
    r""":math:`\log p(k)`: the model keeps ``CLASS_PROBS`` as float32 logits (rounding ~1e-8)."""
    log_p = model.class_logits.log_softmax(-1)
    np.testing.assert_allclose(log_p.exp().numpy(), CLASS_PROBS, rtol=1e-6)
    return log_p[k]


def _log_weight(model, x, k: int, z):
    r""":math:`\log p(k) + \log p(z) + \log p(x \mid z, k) - \log q(z \mid x, k)` per point for
    one class ``k`` and one code per point ``z`` ``(N, 2)``."""
    onehot = F.one_hot(torch.full((len(x),), k), K).double()
    q = model.q_z(x, onehot)
    loc, scale = q.base_dist.loc, q.base_dist.scale
    log_q = (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * np.log(2 * np.pi)).sum(-1)
    log_pz = (-0.5 * z**2 - 0.5 * np.log(2 * np.pi)).sum(-1)
    logits = model.decoder(model.prior.embed(z), onehot).reshape(len(x), D)
    log_px = (x * F.logsigmoid(logits) + (1 - x) * F.logsigmoid(-logits)).sum(-1)
    return _log_pk(model, k) + log_pz + log_px - log_q


def _draws(model, x, k: int, s: int):
    """``s`` codes per point from q(z | x, k), drawn as Pyro's particle plate draws them."""
    onehot = F.one_hot(torch.full((len(x),), k), K).double()
    return model.q_z(x, onehot).rsample((s,))  # (S, N, 2)


def _hand_log_weights(model, x, s: int):
    """``(K, S, N)`` log weights, class by class, particle by particle, from the RNG's state."""
    out = []
    for k in range(K):
        z = _draws(model, x, k, s)
        out.append(torch.stack([_log_weight(model, x, k, z[j]) for j in range(s)]))
    return torch.stack(out)


def _hand_per_class_elbo(model, x, s: int):
    w = _hand_log_weights(model, x, s)
    return torch.stack([sum(w[k, j] for j in range(s)) / s for k in range(K)], -1)  # (N, K)


def _hand_log_likelihood(model, x, s: int):
    w = _hand_log_weights(model, x, s)  # log mean_s exp, then logsumexp over the classes
    per_class = [torch.logsumexp(w[k], 0) - np.log(s) for k in range(K)]
    return torch.logsumexp(torch.stack(per_class, -1), -1), torch.stack(per_class, -1)


def _hand_unlabelled(model, x, per_class):
    log_q = model.label_guide(x).log_softmax(-1)
    return sum(log_q[:, k].exp() * (per_class[:, k] - log_q[:, k]) for k in range(K))


def _blind(model):
    """Decoder blind to z (its z columns zeroed) and q(z | x, y) = N(0, I) (head zeroed)."""
    with torch.no_grad():
        model.decoder.net[0].weight[:, :2] = 0.0
        model.encoder.head.weight.zero_()
        model.encoder.head.bias.zero_()
    return model


def _known_log_joint(model, x):
    r"""For the blind model, :math:`\log p(x, k) = \log p(k) + \log p(x \mid k)` exactly."""
    z = torch.zeros(len(x), 2, dtype=torch.float64)
    cols = []
    for k in range(K):
        onehot = F.one_hot(torch.full((len(x),), k), K).double()
        logits = model.decoder(z, onehot).reshape(len(x), D)
        log_px = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
        cols.append(_log_pk(model, k) + log_px)
    return torch.stack(cols, -1)


def test_blind_model_has_constant_weights_and_the_known_answer():
    model = _blind(_ssvae())
    x = _points(5)
    z = torch.randn(5, 2, dtype=torch.float64) * 3
    for k in range(K):  # the hand weight is p(k) p(x|k) at any z: the closed form holds
        torch.testing.assert_close(
            _log_weight(model, x, k, z), _known_log_joint(model, x)[:, k], rtol=1e-12, atol=0
        )


@pytest.mark.parametrize("seed", [3, 4])
def test_elbo_per_class_is_the_mean_log_weight_of_each_class(seed):
    model, x, s = _ssvae(), _points(5), 4
    pyro.set_rng_seed(seed)
    got = model.elbo_per_class(x, s)
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        hand = _hand_per_class_elbo(model, x, s)
    assert got.shape == (5, K)
    torch.testing.assert_close(got, hand, rtol=1e-10, atol=0)


def test_unlabelled_elbo_is_the_expectation_under_q_y_plus_its_entropy():
    model, x, s = _ssvae(), _points(5), 3
    pyro.set_rng_seed(5)
    got = model.unlabelled_elbo(x, s)  # draws its own per-class bounds
    pyro.set_rng_seed(5)
    with torch.no_grad():
        hand = _hand_unlabelled(model, x, _hand_per_class_elbo(model, x, s))
    assert got.shape == (5,)
    torch.testing.assert_close(got, hand, rtol=1e-10, atol=0)


def test_unlabelled_elbo_of_given_bounds_in_chunks_and_in_eval_mode():
    r"""``per_class`` given: no draw; 1030 points cross the 1024-point chunk; the classifier has
    dropout, off in eval mode, and the model's mode comes back."""
    model = _ssvae(label_guide_args={"dropout": 0.5})
    x = _points(1030)
    per_class = torch.randn(
        1030, K, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    model.eval()
    with torch.no_grad():
        hand = _hand_unlabelled(model, x, per_class)
    for mode in (True, False):
        model.train(mode)
        got = model.unlabelled_elbo(x, per_class=per_class)
        assert model.training is mode and model.label_guide.training is mode
        torch.testing.assert_close(got, hand, rtol=1e-12, atol=0)


@pytest.mark.parametrize("seed", [6, 7])
def test_log_likelihood_is_logsumexp_over_classes_of_the_log_mean_weight(seed):
    model, x, s = _ssvae(), _points(5), 6
    pyro.set_rng_seed(seed)
    ll = model.log_likelihood(x, s, chunk_size=s)
    pyro.set_rng_seed(seed)
    joint = model.log_joint_per_class(x, s, chunk_size=s)
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        hand_ll, hand_joint = _hand_log_likelihood(model, x, s)
    assert ll.shape == (5,) and joint.shape == (5, K)
    torch.testing.assert_close(joint, hand_joint, rtol=1e-10, atol=0)
    torch.testing.assert_close(ll, hand_ll, rtol=1e-10, atol=0)


@pytest.mark.parametrize(
    ("num_samples", "chunk_size", "batch_size"), [(1, 1, 256), (7, 3, 2), (5, 100, 1), (4, 2, 3)]
)
def test_blind_model_bounds_equal_the_closed_form_for_any_samples_chunks_and_batches(
    num_samples, chunk_size, batch_size
):
    r"""Every weight is :math:`\log p(x, k)`: the per-class ELBO and :math:`\log \hat p(x, k)`
    are exact, :math:`\log \hat p(x) = \operatorname{logsumexp}_k \log p(x, k)`, whatever the
    batches (7 points in batches of 1, 2, 3 or one), samples and chunks."""
    model = _blind(_ssvae())
    x = _points(7)
    with torch.no_grad():
        known = _known_log_joint(model, x)
    joint = model.log_joint_per_class(x, num_samples, chunk_size, batch_size)
    elbo = model.elbo_per_class(x, num_samples, batch_size)
    torch.testing.assert_close(joint, known, rtol=1e-12, atol=0)
    torch.testing.assert_close(elbo, known, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        model.log_likelihood(x, num_samples, chunk_size, batch_size),
        torch.logsumexp(known, -1), rtol=1e-12, atol=0,
    )  # fmt: skip


def test_per_class_batching_equals_one_batch_and_runs_in_eval_mode():
    """The encoder has dropout: the bounds are those of eval mode; the mode comes back."""
    model = _blind(_ssvae(encoder_args={"dropout": 0.5}))
    x = _points(7)
    model.eval()
    with torch.no_grad():
        known = _known_log_joint(model, x)
    model.train()
    one = model.elbo_per_class(x, 3, batch_size=7)
    assert model.training and model.encoder.training
    for b in (1, 2, 3, 6):
        # (batches of other sizes round the matrix products differently: ~1e-15)
        torch.testing.assert_close(
            model.elbo_per_class(x, 3, batch_size=b), one, rtol=1e-13, atol=0
        )
    torch.testing.assert_close(one, known, rtol=1e-12, atol=0)
    model.eval()
    model.elbo_per_class(x, 3, batch_size=2)
    assert not model.training and not model.encoder.training


def test_per_class_calls_fn_on_every_batch_and_class_in_order():
    model = _ssvae()
    model.train()
    x = torch.arange(7, dtype=torch.float64)[:, None].expand(7, D)
    calls = []

    def fn(xb, yk):
        calls.append((xb[:, 0].tolist(), yk.tolist(), yk.dtype, model.training))
        return xb[:, 0] * 10 + yk

    out = model._per_class(x, 3, fn)
    expected = torch.tensor([[10.0 * i + k for k in range(K)] for i in range(7)], dtype=x.dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    batches = [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0]]
    assert calls == [(b, [k] * len(b), torch.long, False) for b in batches for k in range(K)]
    assert model.training


def test_predict_is_the_argmax_of_the_eval_logits_in_batches():
    model = _ssvae(label_guide_args={"dropout": 0.5})
    x = _points(11)
    model.eval()
    with torch.no_grad():
        logits = model.label_guide(x)
    hand = torch.tensor([max(range(K), key=lambda k, r=row: float(r[k])) for row in logits])
    for mode in (True, False):
        model.train(mode)
        for b in (1, 4, 1024):
            assert torch.equal(model.predict(x, batch_size=b), hand)
        assert model.training is mode and model.label_guide.training is mode


def test_posterior_mean_is_the_encoder_mean_for_the_given_label():
    model, x = _ssvae(), _points(5)
    y = torch.tensor([0, 2, 1, 1, 0])
    h = model.encoder.features(x)
    raw = model.encoder.head(torch.cat([h, F.one_hot(y, K).double()], -1))
    torch.testing.assert_close(model.posterior_mean(x, y), raw[:, :2], rtol=1e-12, atol=0)


class _PlantedLogits(torch.nn.Module):
    """A classifier whose logits are its input in eval mode (and their negation in train)."""

    def forward(self, x):
        return x if not self.training else -x


def test_labelled_accuracy_on_planted_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1030, K, generator=g)  # across the 1024-point chunk
    y = torch.randint(0, K, (1030,), generator=g)
    hand = sum(int(logits[i].argmax()) == int(y[i]) for i in range(1030)) / 1030
    classifier = _PlantedLogits()
    for mode in (True, False):
        classifier.train(mode)
        assert labelled_accuracy(classifier, logits, y) == pytest.approx(hand, rel=1e-6)
        assert classifier.training is mode
    right = logits.argmax(-1)
    assert labelled_accuracy(classifier, logits, right) == 1.0
    assert labelled_accuracy(classifier, logits, (right + 1) % K) == 0.0


def _hand_confusion(pred, y, k):
    c = np.zeros((k, k), dtype=np.int64)
    for t, p in zip(y.tolist(), pred.tolist(), strict=True):
        c[t, p] += 1
    return c


def test_confusion_counts_and_per_class_accuracy_by_hand():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (50,), generator=g)
    y[y == 2] = 3  # class 2 has no point
    pred = torch.randint(0, 4, (50,), generator=g)
    c = confusion_counts(pred, y, 4)
    np.testing.assert_array_equal(c, _hand_confusion(pred, y, 4))
    assert c.shape == (4, 4) and c.sum() == 50
    names = ["a", "b", "c", "d"]
    acc = per_class_accuracy(c, names)
    for i, name in enumerate(names):
        rows = [j for j in range(50) if int(y[j]) == i]
        if not rows:
            assert acc[name] is None
        else:
            assert acc[name] == sum(int(pred[j]) == i for j in rows) / len(rows)
    assert list(acc) == names
    # the highest class alone: the last cell
    np.testing.assert_array_equal(
        confusion_counts(torch.tensor([3]), torch.tensor([3]), 4),
        np.eye(4, dtype=np.int64)[3:4].T @ np.eye(4, dtype=np.int64)[3:4],
    )


def _se(v):
    v = np.asarray(v, dtype=np.float64)
    return float(np.std(v, ddof=1) / np.sqrt(len(v)))


@pytest.mark.parametrize("labelled", [True, False])
def test_evaluation_metrics_by_hand(labelled):
    r"""The ELBO's draws first (``elbo_samples`` per class), then the log-likelihood's."""
    model, x = _ssvae(), _points(6)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    names = ["zero", "one", "two"]
    s_e, s_l = 3, 5
    model.train()
    pyro.set_rng_seed(8)
    ev = evaluation_metrics(
        model, x, y if labelled else None, names, elbo_samples=s_e, log_likelihood_samples=s_l
    )
    assert not model.training
    pyro.set_rng_seed(8)
    with torch.no_grad():
        per_class = _hand_per_class_elbo(model, x, s_e)
        u = _hand_unlabelled(model, x, per_class)
        ll, _ = _hand_log_likelihood(model, x, s_l)
        logits = model.label_guide(x)
    pred = logits.argmax(-1)
    m = ev.metrics
    assert m["test_elbo"] == pytest.approx(float(u.mean()), rel=1e-10)
    assert m["test_elbo_se"] == pytest.approx(_se(u), rel=1e-8)
    assert m["test_log_likelihood"] == pytest.approx(float(ll.mean()), rel=1e-10)
    assert m["test_log_likelihood_se"] == pytest.approx(_se(ll), rel=1e-8)
    assert m["test_bits_per_dim"] == pytest.approx(-float(ll.mean()) / (D * np.log(2)), rel=1e-10)
    assert (m["elbo_samples"], m["log_likelihood_samples"], m["num_test_points"]) == (s_e, s_l, 6)
    assert "nats per data point" in m["units"]
    torch.testing.assert_close(ev.scores.elbo, u, rtol=1e-10, atol=0)
    torch.testing.assert_close(ev.scores.log_likelihood, ll, rtol=1e-10, atol=0)
    assert ev.scores.num_samples == s_l
    assert torch.equal(ev.predictions, pred)
    if labelled:
        lab = [float(per_class[i, int(y[i])]) for i in range(6)]
        assert m["test_elbo_labelled"] == pytest.approx(sum(lab) / 6, rel=1e-10)
        hand_c = _hand_confusion(pred, y, K)
        np.testing.assert_array_equal(ev.confusion, hand_c)
        assert m["confusion_matrix"] == hand_c.tolist()
        assert m["test_accuracy"] == pytest.approx(float((pred == y).double().mean()), rel=1e-7)
        assert m["per_class_accuracy"] == {
            n: float(hand_c[i, i]) / hand_c[i].sum() for i, n in enumerate(names)
        }
        assert "test_elbo_labelled: L(x, y) at the true label" in m["elbo_definitions"]
    else:
        assert ev.confusion is None
        for key in ("test_accuracy", "per_class_accuracy", "confusion_matrix",
                    "test_elbo_labelled"):  # fmt: skip
            assert key not in m
        assert "test_elbo_labelled" not in m["elbo_definitions"]
    assert m["elbo_definitions"].startswith("test_elbo: unlabelled bound U(x)")
    assert "test_log_likelihood: log p(x) = logsumexp_y" in m["elbo_definitions"]


def test_evaluation_metrics_of_one_point_has_no_standard_error():
    model, x = _ssvae(), _points(1)
    m = evaluation_metrics(model, x, torch.tensor([1]), ["a", "b", "c"], elbo_samples=2,
                           log_likelihood_samples=2).metrics  # fmt: skip
    assert np.isnan(m["test_elbo_se"]) and np.isnan(m["test_log_likelihood_se"])
    assert np.isfinite(m["test_elbo"]) and m["num_test_points"] == 1


# -- the kind's set-up: labelled / unlabelled split, batches, dynamic binarisation, estimators ---


def _split_kind(
    n_l: int, n_u: int, *, dynamic: bool = False, guide: str = "enumerate", global_seed: int = 0,
    **options,
) -> M2Kind:  # fmt: skip
    r"""A kind on 40 points (24 training) with ``n_l`` labelled and ``n_u`` unlabelled ones; with
    ``dynamic`` the pixels are grey levels in {0, 1/3, 2/3, 1}. ``global_seed`` seeds torch's
    global RNG just before the kind is built."""
    torch.manual_seed(0)
    model = build_ssvae((D,), K, likelihood="bernoulli", label_guide=guide, latent_dim=2,
                        hidden_dims=(8,)).double()  # fmt: skip
    rng = np.random.default_rng(0)
    levels = 4 if dynamic else 2
    x = (rng.integers(0, levels, size=(40, D)) / (levels - 1)).astype(np.float32)
    ds = load_data(x, labels=np.arange(40) % K, val_fraction=0.2, test_fraction=0.2, seed=0)
    cfg = SSLConfig(labels=max(n_l, K), label_guide=guide, num_classes=K, likelihood="bernoulli",
                    latent_dim=2, hidden_dims=[8], device="cpu", **options)  # fmt: skip
    splits = (ds.train_x.double(), ds.val_x.double(), ds.test_x.double())
    assert n_l + n_u <= len(ds.train_x)
    torch.manual_seed(global_seed)
    return M2Kind(model, cfg, ds, splits, np.arange(n_l), np.arange(n_l, n_l + n_u), dynamic,
                  torch.device("cpu"))  # fmt: skip


@pytest.mark.parametrize(("n_u", "semi", "steps"), [(0, False, 2), (1, True, 1), (10, True, 3)])
def test_semi_supervised_iff_there_are_unlabelled_points(n_u, semi, steps):
    r"""An epoch is a pass over the unlabelled points (``ceil(N_u / B)`` steps), or without any a
    pass over the labelled ones (``ceil(N_l / B_l)``); 6 labelled points, batches of 4."""
    kind = _split_kind(6, n_u, batch_size=4)
    assert kind.semi is semi
    assert kind.steps_per_epoch() == steps
    kind.start_epoch(0, torch.device("cpu"))
    x_l, y_l, x_u, b_l, b_u = kind.batch(0, lambda idx: idx)
    assert (len(x_l), b_l) == (4, 4)
    assert (len(x_u), b_u) == ((min(n_u, 4),) * 2 if semi else (0, 1))
    assert torch.isfinite(kind.loss(x_l, y_l, x_u, b_l, b_u))


@pytest.mark.parametrize(
    ("labelled_batch_size", "batch_size", "b_l"),
    [(3, 8, 3), (None, 8, 6), (None, 4, 4), (50, 4, 6)],
)
def test_labelled_batch_size_and_passes_over_the_labelled_points(
    labelled_batch_size, batch_size, b_l
):
    r""":math:`B_l` = ``labelled_batch_size`` (default ``batch_size``), at most :math:`N_l`; the
    labelled batches are consecutive slices of one shuffle per pass."""
    kind = _split_kind(6, 12, labelled_batch_size=labelled_batch_size, batch_size=batch_size)
    assert kind.b_l == b_l
    kind.start_epoch(0, torch.device("cpu"))
    for b in range(3):
        x_l, _, _, n, _ = kind.batch(b, lambda idx: idx)
        assert n == b_l and len(x_l) == b_l
    fresh = _split_kind(6, 12, labelled_batch_size=labelled_batch_size, batch_size=batch_size)
    for _ in range(2):  # two passes: each a permutation of the labelled points
        seen = [i for _ in range(6 // b_l) for i in fresh.labelled_batches.next().tolist()]
        assert len(seen) == (6 // b_l) * b_l and len(set(seen)) == len(seen)
        assert set(seen) <= set(range(6))


def test_labelled_batches_are_fixed_by_the_seed_not_by_the_global_rng():
    a, b = _split_kind(6, 12, global_seed=1), _split_kind(6, 12, global_seed=2)
    torch.manual_seed(3)
    first = [a.labelled_batches.next().tolist() for _ in range(5)]
    torch.manual_seed(4)
    second = [b.labelled_batches.next().tolist() for _ in range(5)]
    assert first == second
    for batch in first:
        assert len(batch) == a.b_l and set(batch) <= set(range(6))


def test_dynamic_labelled_evaluation_points_are_binarised_once_from_the_seed():
    a, b = _split_kind(6, 12, dynamic=True, global_seed=1), _split_kind(6, 12, dynamic=True,
                                                                       global_seed=2)  # fmt: skip
    assert bool(((a.x_l > 0) & (a.x_l < 1)).any())  # grey levels to binarise
    assert set(a.x_l_eval.unique().tolist()) <= {0.0, 1.0}
    assert a.x_l_eval.shape == a.x_l.shape and a.x_l_eval.dtype == a.x_l.dtype
    # black and white pixels stay, grey ones become 0 or 1, the same draw whatever the global RNG
    sure = (a.x_l == 0) | (a.x_l == 1)
    assert torch.equal(a.x_l_eval[sure], a.x_l[sure])
    assert torch.equal(a.x_l_eval, b.x_l_eval)
    static = _split_kind(6, 12)
    assert static.x_l_eval is static.x_l
    acc = static.validate()["labelled_accuracy"]
    hand = (static.model.label_guide(static.x_l).argmax(-1) == static.y_l).double().mean()
    assert acc == pytest.approx(float(hand))


@pytest.mark.parametrize("seed", [1, 2])
def test_dynamic_step_loss_binarises_labelled_then_unlabelled_points(seed):
    r"""With dynamic binarisation :math:`J` is that of Bernoulli draws of the grey pixels: the
    labelled points', then (after the labelled bound's z) the unlabelled points'."""
    kind = _split_kind(6, 12, dynamic=True)
    model = kind.model
    x_l, y_l, x_u = kind.x_l[:4], kind.y_l[:4], kind.x_u[:8]
    b_l, b_u = 8, 16
    pyro.set_rng_seed(seed)
    loss = kind.loss(x_l, y_l, x_u, b_l, b_u)
    pyro.set_rng_seed(seed)
    xb_l = torch.bernoulli(x_l)
    elbo_l = _labelled_elbo(model, xb_l, y_l, None)
    log_q_y = model.label_guide(xb_l).log_softmax(-1).gather(1, y_l[:, None]).squeeze(1)
    xb_u = torch.bernoulli(x_u)
    elbo_u = _unlabelled_elbo(model, xb_u)
    w_l, w_u = 6 / 18, 12 / 18
    # the default weight, alpha = "auto": ALPHA_PER_DIMENSION (1) per data dimension, D = 4 here
    alpha = 1.0 * D
    hand = w_l / b_l * (-elbo_l).sum() + alpha / b_l * (-log_q_y).sum() + w_u / b_u * (-elbo_u).sum()
    assert kind.cfg.alpha == "auto" and kind.alpha == alpha
    torch.testing.assert_close(loss, hand, rtol=RTOL, atol=0)


def test_a_chosen_estimator_must_match_the_label_guide():
    r"""``estimator='enum'`` trains an enumerating guide (the labelled bound, without a y site,
    stays ``Trace_ELBO`` and on the fast path); ``'trace'`` cannot, and ``'enum'`` cannot train
    the relaxed guide."""
    kind = _split_kind(6, 12, estimator="enum")
    assert type(kind.labelled_elbo) is pyro.infer.Trace_ELBO
    assert type(kind.unlabelled_elbo) is pyro.infer.TraceEnum_ELBO
    assert type(kind.class_elbo) is pyro.infer.Trace_ELBO
    assert kind.terms.state == dict.fromkeys(("labelled", "classification", "unlabelled"))
    assert kind.estimator == "enum"
    relaxed = _split_kind(6, 12, guide="relaxed", estimator="trace")
    assert type(relaxed.labelled_elbo) is type(relaxed.unlabelled_elbo) is pyro.infer.Trace_ELBO
    message = (
        r"estimator 'trace' cannot train label guide 'enumerate': only 'enum' sums over an "
        r"enumerated y, and only an enumerating guide \(estimator 'enum'\) enumerates it"
    )
    with pytest.raises(ConfigError, match=message):
        _split_kind(6, 12, estimator="trace")
    with pytest.raises(ConfigError, match=r"estimator 'enum' cannot train label guide 'relaxed'"):
        _split_kind(6, 12, guide="relaxed", estimator="enum")


def test_default_estimators_follow_the_label_guide():
    kind = _split_kind(6, 12)
    assert kind.estimator == "enum"
    assert type(kind.labelled_elbo) is pyro.infer.Trace_ELBO
    assert type(kind.unlabelled_elbo) is pyro.infer.TraceEnum_ELBO
    sample = _split_kind(6, 12, guide="sample")
    assert isinstance(sample.labelled_elbo, pyro.infer.TraceGraph_ELBO)


def test_a_fresh_kind_has_no_baseline_and_no_predictions_yet():
    kind = _split_kind(6, 12)
    assert kind.baseline is None and kind.baseline_history == []
    assert kind.predictions is None and kind.confusion is None


def test_default_number_of_samples_of_the_elbo_is_10():
    model, x = _ssvae(), _points(3)
    pyro.set_rng_seed(9)
    elbo, u = model.elbo_per_class(x), model.unlabelled_elbo(x)
    pyro.set_rng_seed(9)
    with torch.no_grad():
        hand_elbo = _hand_per_class_elbo(model, x, 10)
        hand_u = _hand_unlabelled(model, x, _hand_per_class_elbo(model, x, 10))
    torch.testing.assert_close(elbo, hand_elbo, rtol=1e-10, atol=0)
    torch.testing.assert_close(u, hand_u, rtol=1e-10, atol=0)


def test_default_number_of_samples_of_log_p_is_100():
    model, x = _ssvae(), _points(2)
    pyro.set_rng_seed(9)
    joint = model.log_joint_per_class(x)
    pyro.set_rng_seed(9)
    with torch.no_grad():
        hand_ll, hand_joint = _hand_log_likelihood(model, x, 100)
    torch.testing.assert_close(joint, hand_joint, rtol=1e-10, atol=0)
    pyro.set_rng_seed(9)
    torch.testing.assert_close(model.log_likelihood(x), hand_ll, rtol=1e-10, atol=0)
