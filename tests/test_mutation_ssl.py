"""M2's model set-up and test metrics, checked where the mutation run of 2026-12-02 (second pass,
``mutmut run "ppl_vae.kinds.m2*" "ppl_vae.ssl*"``) found them unchecked: the checks of
:class:`~ppl_vae.ssl.SSVAE`'s constructor and labels with their messages, p(y) from
un-normalised class weights, and :func:`~ppl_vae.kinds.m2.evaluation_metrics`' accuracy,
standard error and bits per dimension, each against a hand computation.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch

from ppl_vae.kinds.m2 import ELBO_DEFINITIONS, UNITS, evaluation_metrics
from ppl_vae.models.errors import ConfigError
from ppl_vae.ssl import SSVAE, build_ssvae

K, D = 3, 4


def _model(**kw) -> SSVAE:
    torch.manual_seed(0)
    kw = {"likelihood": "bernoulli", **kw}
    return build_ssvae((D,), K, label_guide="enumerate", latent_dim=2, hidden_dims=(8,), **kw)


def _parts(model: SSVAE) -> dict:
    return {
        "prior": model.prior,
        "likelihood": model.likelihood,
        "encoder": model.encoder,
        "decoder": model.decoder,
        "label_guide": model.label_guide,
    }


class _Net(torch.nn.Module):
    def __init__(self, cond_dim: int | None = None) -> None:
        super().__init__()
        if cond_dim is not None:
            self.cond_dim = cond_dim


@pytest.mark.parametrize(
    ("part", "net", "message"),
    [
        ("encoder", _Net(), "the encoder must be built with cond_dim=3 (one-hot labels), got "
         "cond_dim=None"),
        ("decoder", _Net(2), "the decoder must be built with cond_dim=3 (one-hot labels), got "
         "cond_dim=2"),
    ],
)  # fmt: skip
def test_networks_without_the_label_input_are_refused_by_name(part, net, message):
    parts = _parts(_model())
    parts[part] = net
    with pytest.raises(ConfigError) as err:
        SSVAE(**parts)
    assert str(err.value) == message


def test_class_weights_are_normalised_into_p_y():
    # weights 1 : 3 : 4 need dividing by their sum 8; multiplying would give 8 : 24 : 32
    model = SSVAE(**_parts(_model()), class_probs=torch.tensor([1.0, 3.0, 4.0]))
    np.testing.assert_allclose(model.class_logits.numpy(), np.log([1 / 8, 3 / 8, 4 / 8]), rtol=1e-6)
    uniform = SSVAE(**_parts(_model()))
    np.testing.assert_allclose(uniform.class_logits.numpy(), np.log([1 / 3] * 3), rtol=1e-6)


@pytest.mark.parametrize(
    ("probs", "shown"),
    [([0.5, 0.5], "[0.5, 0.5]"), ([0.5, 0.5, 0.0], "[0.5, 0.5, 0.0]"),
     ([0.6, 0.6, -0.2], "[0.6", )],
)  # fmt: skip
def test_class_weights_of_the_wrong_length_or_not_positive_are_refused(probs, shown):
    with pytest.raises(ConfigError) as err:
        SSVAE(**_parts(_model()), class_probs=torch.tensor(probs))
    assert str(err.value).startswith(f"`class_probs` must be 3 positive numbers, got {shown}")


@pytest.mark.parametrize(
    ("y", "message"),
    [
        (torch.tensor([0.0, 1.0]), "labels must be integer class indices, got dtype torch.float32"),
        (torch.tensor([-1, 2]), "labels must be in [0, 3), got values in [-1, 2]"),
        (torch.tensor([0, 3]), "labels must be in [0, 3), got values in [0, 3]"),
        (torch.tensor([1, 5]), "labels must be in [0, 3), got values in [1, 5]"),
    ],
)
def test_labels_outside_the_classes_are_refused_with_their_range(y, message):
    model = _model()
    with pytest.raises(ConfigError) as err:
        model.one_hot(y, torch.zeros(2, D))
    assert str(err.value) == message
    # in range: the one-hot rows, in the dtype of `like`
    eye = model.one_hot(torch.tensor([2, 0]), torch.zeros(2, D, dtype=torch.float64))
    assert eye.dtype == torch.float64
    assert eye.tolist() == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]


def _x(n: int, levels: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if levels is None:
        return torch.bernoulli(torch.full((n, D), 0.4), generator=g)
    return torch.randint(0, levels, (n, D), generator=g).float() / (levels - 1)


def test_accuracy_is_the_fraction_of_correct_predictions():
    model, x = _model(), _x(6)
    with torch.no_grad():
        pred = model.label_guide(x).argmax(-1)
    y = pred.clone()
    y[4:] = (pred[4:] + 1) % K  # 4 of 6 right: 2/3 (the wrong ones would give 1/3)
    pyro.set_rng_seed(0)
    m = evaluation_metrics(model, x, y, ["a", "b", "c"], elbo_samples=1,
                           log_likelihood_samples=1).metrics  # fmt: skip
    assert m["test_accuracy"] == pytest.approx(4 / 6, rel=1e-6)


def test_two_points_have_a_standard_error_sd_over_root_two():
    model, x = _model(), _x(2)
    pyro.set_rng_seed(0)
    ev = evaluation_metrics(model, x, None, ["a", "b", "c"], elbo_samples=2,
                            log_likelihood_samples=2)  # fmt: skip
    for key, v in (("test_elbo_se", ev.scores.elbo), ("test_log_likelihood_se",
                                                     ev.scores.log_likelihood)):  # fmt: skip
        a, b = (float(t) for t in v)
        # the sample sd of two numbers is |a - b| / sqrt(2); over sqrt(n = 2): |a - b| / 2
        assert ev.metrics[key] == pytest.approx(abs(a - b) / 2, rel=1e-5)
        assert a != b


def test_bits_per_dim_of_a_density_on_quantised_data_adds_log2_of_the_levels_minus_one():
    # a density (normal likelihood) on 5-level data scaled to [0, 1]: the change of variables
    # to the integer grid adds log2(5 - 1) = 2 bits per dimension
    model, x = _model(likelihood="normal"), _x(5, levels=5)
    pyro.set_rng_seed(0)
    m = evaluation_metrics(model, x, None, ["a", "b", "c"], elbo_samples=1,
                           log_likelihood_samples=2, num_levels=5).metrics  # fmt: skip
    ll = m["test_log_likelihood"]
    assert m["test_bits_per_dim"] == pytest.approx(-ll / (D * math.log(2)) + 2.0, rel=1e-6)
    pyro.set_rng_seed(0)
    m = evaluation_metrics(model, x, None, ["a", "b", "c"], elbo_samples=1,
                           log_likelihood_samples=2).metrics  # fmt: skip
    assert m["test_bits_per_dim"] is None  # a density without known levels has no convention


@pytest.mark.parametrize("labelled", [True, False])
def test_metric_definitions_name_the_labelled_bound_only_with_labels(labelled):
    model, x = _model(), _x(3)
    pyro.set_rng_seed(0)
    y = torch.tensor([0, 1, 2]) if labelled else None
    m = evaluation_metrics(model, x, y, ["a", "b", "c"], elbo_samples=1,
                           log_likelihood_samples=1).metrics  # fmt: skip
    assert m["units"] == UNITS
    first, lab, ll = ELBO_DEFINITIONS
    assert m["elbo_definitions"] == (f"{first}; {lab}; {ll}" if labelled else f"{first}; {ll}")
