"""Which M2 terms the fast path serves, and the reason it records for each it does not
(``M2Loss.reason``, shown by ``M2Kind.step_paths``' fall-backs), where the mutation run of
2026-12-02 (second pass) found them unchecked: a non-engine model or label guide, a method
redefined on the class or the instance, an estimator with more than one particle or enumeration
outside the unlabelled term, and the site checks' observed / latent message."""

from __future__ import annotations

from types import SimpleNamespace

import pyro.infer
import torch

from ppl_vae.inference import m2_fastpath as fp
from ppl_vae.inference.m2_fastpath import TERMS, M2Loss
from ppl_vae.ssl import SSVAE
from tests.test_m2_fastpath import make_model


def _loss(model, labelled=None, unlabelled=None, cls=None) -> M2Loss:
    return M2Loss(
        model,
        labelled or pyro.infer.Trace_ELBO(max_plate_nesting=1),
        unlabelled or pyro.infer.TraceEnum_ELBO(max_plate_nesting=1),
        cls or pyro.infer.Trace_ELBO(max_plate_nesting=1),
    )


def test_the_engine_pair_is_served_with_no_reason_yet():
    loss = _loss(make_model("enumerate"))
    assert loss.reason == {t: "" for t in TERMS}
    assert loss.state == dict.fromkeys(TERMS)  # each term is probed at its first step


def test_estimators_it_cannot_compute_are_named():
    loss = _loss(
        make_model("enumerate"),
        labelled=pyro.infer.TraceEnum_ELBO(max_plate_nesting=1),
        cls=pyro.infer.Trace_ELBO(num_particles=2, max_plate_nesting=1),
    )
    assert loss.reason == {
        "labelled": "not served: TraceEnum_ELBO serves only the unlabelled term",
        "classification": "not served: estimator Trace_ELBO (num_particles=2)",
        "unlabelled": "",
    }
    assert loss.state == {"labelled": False, "classification": False, "unlabelled": None}
    assert fp.served_estimator(object()) is None  # no num_particles: not an ELBO it knows


class _NotSSVAE(torch.nn.Module):
    pass


class _OwnModel(SSVAE):
    def model(self, x, y=None):  # a user's variation of the generative program
        return super().model(x, y)


class _NotALabelGuide(torch.nn.Module):
    pass


def _all_terms(why: str) -> dict[str, str]:
    return {t: f"not served: {why}" for t in TERMS}


def test_a_model_or_label_guide_that_is_not_the_engines_is_named():
    assert _loss(_NotSSVAE()).reason == _all_terms("_NotSSVAE is not an SSVAE")
    model = make_model("enumerate")
    model.__class__ = _OwnModel
    assert _loss(model).reason == _all_terms("_OwnModel redefines model")
    model = make_model("enumerate")
    model.label_guide = _NotALabelGuide()
    assert _loss(model).reason == _all_terms("the label guide _NotALabelGuide is not a LabelGuide")


def test_a_label_guide_whose_sample_is_replaced_on_the_instance_is_named():
    model = make_model("enumerate")
    guide = model.label_guide
    guide.sample = guide.sample  # an instance attribute shadows the class's method
    name = type(guide).__name__
    assert _loss(model).reason == _all_terms(f"the label guide {name} redefines sample")


def _site(name: str, observed: bool) -> dict:
    return {"name": name, "is_observed": observed, "mask": None, "scale": 1.0,
            "cond_indep_stack": (SimpleNamespace(name="data"),)}  # fmt: skip


def test_site_checks_say_whether_a_site_is_observed_or_latent():
    sites = [_site("y", True), _site("z", False)]
    assert fp._check_sites("model", sites, ["y", "z"], set(), {}) == "model site 'y' is observed"
    assert fp._check_sites("model", sites, ["y", "z"], {"y", "z"}, {}) == (
        "model site 'z' is latent"
    )
