r"""The M2 kind (Kingma et al. 2014): :class:`~ppl_vae.ssl.SSVAE` on labelled and unlabelled data.

Each step sees a labelled mini-batch (cycled through the labelled subset, reshuffled at every
pass) and an unlabelled one (an epoch is one pass over the unlabelled points). With
:math:`B_l, B_u` the sizes of the *global* batches and :math:`l_r, u_r` this rank's shards, the
step loss of a shard is

.. math:: J_r = \frac{w_l}{B_l} \sum_{i \in l_r} -\mathcal{L}(x_i, y_i)
    + \alpha\, \frac{1}{B_l} \sum_{i \in l_r} -\log q_\phi(y_i \mid x_i)
    + \frac{w_u}{B_u} \sum_{i \in u_r} -\mathcal{U}(x_i),

with :math:`w_l = N_l / N`, :math:`w_u = N_u / N`: three Pyro ELBOs, each the
``differentiable_loss`` of a Pyro program pair (after a first validated Pyro step,
:class:`~ppl_vae.inference.m2_fastpath.M2Loss` computes the ``Trace_ELBO`` and ``TraceEnum_ELBO``
ones from the modules directly, with Pyro's values and gradients up to float rounding; ``M2Kind.fast = False``
keeps Pyro's). The labelled bound is ``Trace_ELBO`` (or
``TraceGraph_ELBO`` for score-function label guides) on ``model(x, y)`` / ``guide(x, y)``; the
unlabelled one is the label guide's estimator on ``model(x)`` / ``guide(x)`` (a config's
``estimator``, when set, trains both bounds instead); the classification
term is ``Trace_ELBO`` on :meth:`~ppl_vae.ssl.SSVAE.classifier_model`, whose observed site is
scaled by :math:`1/B_l` with ``poutine.scale``, as Pyro's own M2 example writes it. The shards'
losses sum to the single-process step loss (in one process the shards are the batches).

Validation: the classifier's accuracy on the validation split picks ``best.pt`` (ties: the later
epoch), and the best weights are the ones evaluated. Test: accuracy (per class and the confusion
matrix), the unlabelled bound with ``y`` summed out exactly and the bound at the true label, the
importance-sampled :math:`\log p(x)` with ``y`` summed out exactly (:func:`evaluation_metrics`,
shared with ``ppl-vae evaluate``), and optionally the supervised baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

from ..components import build as build_component
from ..components import spec_of
from ..config import resolve_alpha
from ..data import Dataset
from ..guides.labels.base import LabelGuide
from ..inference.estimators import make_elbo, parse_estimator
from ..inference.m2_fastpath import M2Loss
from ..inference.scoring import Scores, bits_per_dim
from ..models.errors import ConfigError
from ..training.trainer import write_history_csv
from .base import ModelKind

__all__ = [
    "ELBO_DEFINITIONS",
    "LOG_LIKELIHOOD_SAMPLES",
    "TRAIN_LOG_LIKELIHOOD_SAMPLES",
    "UNITS",
    "Cycler",
    "M2Evaluation",
    "M2Kind",
    "confusion_counts",
    "evaluation_metrics",
    "labelled_accuracy",
    "per_class_accuracy",
]


class Cycler:  # pragma: no mutate block
    """Endless shuffled mini-batches of ``range(n)`` (reshuffled at every pass)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.perm = torch.randperm(n, generator=generator)
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.n:
            self.perm = torch.randperm(self.n, generator=self.generator)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "perm": self.perm, "pos": self.pos}

    def load(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.perm = state["perm"].cpu()
        self.pos = int(state["pos"])


def labelled_accuracy(classifier: LabelGuide, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of ``classifier``'s most probable class on ``(x, y)``, in eval mode."""
    with torch.no_grad():
        was = classifier.training
        classifier.eval()
        try:
            pred = torch.cat(
                [classifier(x[i : i + 1024]).argmax(-1) for i in range(0, len(x), 1024)]
            )
        finally:
            classifier.train(was)
        return float((pred == y).float().mean())


def confusion_counts(pred: torch.Tensor, y: torch.Tensor, k: int) -> np.ndarray:
    """Counts ``[true, predicted]``, ``(K, K)``."""
    flat = (y.long() * k + pred.long()).cpu()
    return torch.bincount(flat, minlength=k * k).reshape(k, k).numpy()


def per_class_accuracy(confusion: np.ndarray, names: list[str]) -> dict[str, float | None]:
    """Accuracy per true class from a confusion matrix (None for a class with no point)."""
    totals = confusion.sum(1)
    return {
        name: (float(confusion[i, i] / totals[i]) if totals[i] else None)
        for i, name in enumerate(names)
    }


#: Importance samples of z per class for the test log-likelihood at the end of training
#: (``metrics.json``); ``ppl-vae evaluate`` takes :data:`LOG_LIKELIHOOD_SAMPLES` by default.
TRAIN_LOG_LIKELIHOOD_SAMPLES = 20
#: Importance samples of z per class for ``ppl-vae evaluate`` on an M2 run (``--log-likelihood-samples``).
LOG_LIKELIHOOD_SAMPLES = 100


#: ``metrics.json``'s ``units`` of an M2 evaluation.
UNITS = "accuracy in [0, 1]; ELBO and log-likelihood in nats per data point"
#: ``metrics.json``'s ``elbo_definitions``: the unlabelled bound, the labelled one (with labels
#: only) and the log-likelihood, joined by ``"; "``.
ELBO_DEFINITIONS = (
    "test_elbo: unlabelled bound U(x) = sum_y q(y|x) [L(x, y) - log q(y|x)], y summed out "
    "exactly, elbo_samples z per class",
    "test_elbo_labelled: L(x, y) at the true label",
    "test_log_likelihood: log p(x) = logsumexp_y log mean_s p(x, y, z_s) / q(z_s | x, y), "
    "z_s ~ q(z | x, y), log_likelihood_samples z per class, y summed out exactly",
)


@dataclass
class M2Evaluation:
    """What :func:`evaluation_metrics` returns.

    Attributes:
        metrics: JSON-able test metrics.
        scores: per point, the unlabelled ELBO and the log-likelihood (y summed out exactly).
        predictions: the classifier's class per point; ``confusion`` its ``(K, K)`` counts
            (both None without labels).
    """

    metrics: dict[str, Any]
    scores: Scores
    predictions: torch.Tensor
    confusion: np.ndarray | None


def evaluation_metrics(
    model: Any,
    x: torch.Tensor,
    y: torch.Tensor | None,
    class_names: list[str],
    *,
    elbo_samples: int,
    log_likelihood_samples: int,
    num_levels: int | None = None,
) -> M2Evaluation:
    r"""Test metrics of a trained :class:`~ppl_vae.ssl.SSVAE` on ``x`` (labels ``y`` or None).

    - with labels: ``test_accuracy`` (the classifier's most probable class), ``per_class_accuracy``,
      ``confusion_matrix`` and ``test_elbo_labelled`` (:math:`\mathcal{L}(x, y)` at the true
      label);
    - always: ``test_elbo``, the unlabelled bound :math:`\mathcal{U}(x)` with y summed out
      exactly (``elbo_samples`` z per class), and ``test_log_likelihood``, the importance-sampled
      :math:`\log p(x) = \operatorname{logsumexp}_k \log \hat p(x, k)` with y summed out
      exactly (``log_likelihood_samples`` z per class,
      :meth:`~ppl_vae.ssl.SSVAE.log_likelihood`), each with its standard error over points.

    Random draws: the ELBO's first, then the log-likelihood's (so ``test_elbo`` does not depend
    on ``log_likelihood_samples``).
    """
    with torch.no_grad():
        model.eval()
        k = model.num_classes
        pred = model.predict(x)
        per_class = model.elbo_per_class(x, elbo_samples)
        u = model.unlabelled_elbo(x, per_class=per_class)
        ll = model.log_likelihood(x, log_likelihood_samples)
        n = len(x)

        def se(v: torch.Tensor) -> float:
            return float(v.std() / math.sqrt(n)) if n > 1 else float("nan")

        metrics: dict[str, Any] = {}
        confusion = None
        if y is not None:
            confusion = confusion_counts(pred, y, k)
            lab = per_class.gather(1, y[:, None].long()).squeeze(1)
            metrics.update(
                test_accuracy=float((pred == y).float().mean()),
                per_class_accuracy=per_class_accuracy(confusion, class_names),
            )
        metrics.update(
            test_elbo=float(u.mean()),
            test_elbo_se=se(u),
            test_log_likelihood=float(ll.mean()),
            test_log_likelihood_se=se(ll),
            test_bits_per_dim=bits_per_dim(model.likelihood, float(ll.mean()), num_levels),
        )
        if y is not None:
            metrics["test_elbo_labelled"] = float(lab.mean())
        metrics.update(
            elbo_samples=elbo_samples,
            log_likelihood_samples=log_likelihood_samples,
            num_test_points=n,
            units=UNITS,
            elbo_definitions="; ".join(
                [ELBO_DEFINITIONS[0]]
                + ([ELBO_DEFINITIONS[1]] if y is not None else [])
                + [ELBO_DEFINITIONS[2]]
            ),
        )
        if confusion is not None:
            metrics["confusion_matrix"] = confusion.tolist()
        return M2Evaluation(metrics, Scores(u, ll, log_likelihood_samples), pred, confusion)


class M2Kind(ModelKind):
    """The semi-supervised M2 model as a model kind.

    Args:
        model: the :class:`~ppl_vae.ssl.SSVAE`.
        cfg: the run's :class:`~ppl_vae.ssl.SSLConfig` (resolved: likelihood and classes set).
        dataset: the data set (labels of every split).
        splits: ``(train, val, test)`` after :func:`~ppl_vae.training.setup.prepare_data`.
        labelled: indices of the labelled training points; ``unlabelled`` the others.
        dynamic: re-binarise every training batch.
        device: where the data live.
    """

    name = "m2"
    monitor = "val_accuracy"
    restore_best = True
    part_names = ("labelled_loss", "unlabelled_loss", "class_loss")
    progress_label = "ssl"

    def __init__(
        self,
        model: Any,
        cfg: Any,
        dataset: Dataset,
        splits: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        labelled: np.ndarray,
        unlabelled: np.ndarray,
        dynamic: bool,
        device: torch.device,
    ) -> None:
        super().__init__(model, cfg.seed)
        self.model, self.cfg, self.dataset, self.device = model, cfg, dataset, device
        self.labelled, self.unlabelled = labelled, unlabelled
        train_x, self.val_x, self.test_x = splits
        assert dataset.train_y is not None
        lab_idx = torch.as_tensor(labelled, device=device)
        self.x_l, self.y_l = train_x[lab_idx], dataset.train_y[lab_idx]
        self.x_u = train_x[torch.as_tensor(unlabelled, device=device)]
        self.n_l, self.n_u = len(labelled), len(unlabelled)
        self.semi = self.n_u > 0
        self.dynamic = dynamic
        # labelled points for the per-epoch training accuracy, binarised once if needed
        self.x_l_eval = self.x_l
        if dynamic:
            g = torch.Generator().manual_seed(cfg.seed + 2)
            self.x_l_eval = torch.bernoulli(self.x_l.cpu(), generator=g).to(device)
        self.b_l = min(cfg.labelled_batch_size or cfg.batch_size, self.n_l)
        self.labelled_batches = Cycler(
            self.n_l, self.b_l, torch.Generator().manual_seed(cfg.seed + 1)
        )
        own = type(model.label_guide).estimator
        chosen = getattr(cfg, "estimator", None)
        self.estimator = own if chosen is None else chosen
        if chosen is not None and (parse_estimator(chosen)[0] == "enum") != (own == "enum"):
            raise ConfigError(
                f"estimator {chosen!r} cannot train label guide {cfg.label_guide!r}: only 'enum' "
                "sums over an enumerated y, and only an enumerating guide (estimator "
                f"{own!r}) enumerates it"
            )
        self.unlabelled_elbo = make_elbo(self.estimator, cfg.num_particles, max_plate_nesting=1)
        # The labelled bound has no y site: by default 'trace' ('tracegraph' for score-function
        # guides); a chosen estimator trains it too ('enum' there is 'trace').
        labelled = ("tracegraph" if own == "tracegraph" else "trace") if chosen is None else chosen
        self.labelled_elbo = make_elbo(
            "trace" if labelled == "enum" else labelled, cfg.num_particles, max_plate_nesting=1
        )
        self.class_elbo = make_elbo("trace", 1, max_plate_nesting=1)
        # The three terms, computed without Pyro's tracing where the estimators allow it.
        self.terms = M2Loss(model, self.labelled_elbo, self.unlabelled_elbo, self.class_elbo)
        total = self.n_l + self.n_u
        self.w_l, self.w_u = self.n_l / total, self.n_u / total
        #: the classification weight applied (``cfg.alpha``, or from D for ``"auto"``)
        self.alpha = resolve_alpha(cfg.alpha, tuple(train_x.shape[1:]))
        self._perm = torch.zeros(0, dtype=torch.long)
        self.baseline: LabelGuide | None = None
        self.baseline_history: list[dict[str, float]] = []
        self.predictions: torch.Tensor | None = None
        self.confusion: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    # -- batches -----------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:  # pragma: no mutate block
        if self.semi:
            return math.ceil(self.n_u / self.cfg.batch_size)
        return math.ceil(self.n_l / self.b_l)

    def start_epoch(self, epoch: int, device: torch.device) -> None:  # pragma: no mutate block
        self._perm = torch.randperm(max(self.n_u, 1), generator=self.shuffle).to(device)

    def batch(self, b: int, shard: Any) -> tuple[Any, ...]:  # pragma: no mutate block
        # Every rank draws the same global batches and takes its shard of each.
        lab_batch = self.labelled_batches.next().to(self.device)
        idx = shard(lab_batch)
        if self.semi:
            size = self.cfg.batch_size
            unl_batch = self._perm[b * size : (b + 1) * size]
            return (self.x_l[idx], self.y_l[idx], self.x_u[shard(unl_batch)],
                    len(lab_batch), len(unl_batch))  # fmt: skip
        return self.x_l[idx], self.y_l[idx], self.x_u[:0], len(lab_batch), 1

    def batch_state(self) -> dict[str, Any]:  # pragma: no mutate block
        return {"labelled_batches": self.labelled_batches.state()}

    def load_batch_state(self, state: dict[str, Any]) -> None:  # pragma: no mutate block
        self.labelled_batches.load(state["labelled_batches"])

    # -- objective ---------------------------------------------------------------------------
    @property
    def step_paths(self) -> dict[str, int] | None:
        """Term evaluations (labelled, unlabelled, classification) per implementation, and
        ``pyro_terms``: the terms the fast path does not serve (Pyro's ELBO at every step)."""
        off = [t for t, on in self.terms.state.items() if on is False]
        return {**self.terms.steps, "pyro_terms": len(off)}

    @property
    def fast(self) -> bool:
        """Use the fast path where it applies (:mod:`ppl_vae.inference.m2_fastpath`)."""
        return self.terms.fast

    @fast.setter
    def fast(self, value: bool) -> None:
        self.terms.fast = bool(value)

    def loss(
        self, x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor, b_l: int, b_u: int
    ) -> torch.Tensor:
        """:math:`J_r` of the module docstring; :attr:`parts` gets its three (unweighted) terms.

        Dynamic binarisation happens here, labelled points first.
        """
        terms = self.terms
        n_l = len(y_l)
        zero = x_l.new_zeros(())
        loss_l = loss_c = loss_u = zero
        if n_l:
            if self.dynamic:
                x_l = torch.bernoulli(x_l)
            loss_l = terms.labelled(x_l, y_l) / b_l
            loss_c = terms.classification(x_l, y_l, 1.0 / b_l)
        loss = self.w_l * loss_l + self.alpha * loss_c
        if len(x_u):
            if self.dynamic:
                x_u = torch.bernoulli(x_u)
            loss_u = terms.unlabelled(x_u) / b_u
            loss = loss + self.w_u * loss_u
        self.parts = torch.stack([loss_l.detach(), loss_u.detach(), loss_c.detach()])
        return loss

    def train_columns(
        self, sums: torch.Tensor, steps: int
    ) -> dict[str, float]:  # pragma: no mutate block
        names = ("loss", *self.part_names)
        row = {k: float(v) / steps for k, v in zip(names, sums, strict=True)}
        if not self.semi:
            row["unlabelled_loss"] = float("nan")
        return row

    def schedule_columns(self) -> dict[str, float]:  # pragma: no mutate block
        temperature = getattr(self.model.label_guide, "temperature", None)
        return {} if temperature is None else {"temperature": float(temperature)}

    # -- reports -----------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:  # pragma: no mutate block
        guide = self.model.label_guide
        return {
            "labelled_accuracy": labelled_accuracy(guide, self.x_l_eval, self.y_l),
            "val_accuracy": labelled_accuracy(guide, self.val_x, self.dataset.val_y),
        }

    def evaluate(
        self, history: list[dict[str, float]], train_seconds: float
    ) -> dict[str, Any]:  # pragma: no mutate block
        model, cfg, ds = self.model, self.cfg, self.dataset
        model.eval()
        k = self.num_classes
        class_names = list(ds.class_names or [str(i) for i in range(k)])
        report = evaluation_metrics(
            model,
            self.test_x,
            ds.test_y,
            class_names,
            elbo_samples=cfg.elbo_samples,
            log_likelihood_samples=TRAIN_LOG_LIKELIHOOD_SAMPLES,
            num_levels=ds.num_levels,
        )
        self.predictions, self.confusion = report.predictions, report.confusion
        counts = np.bincount(ds.train_y.cpu().numpy()[self.labelled], minlength=k)
        best = max(history, key=lambda h: (h["val_accuracy"], h["epoch"])) if history else None
        metrics: dict[str, Any] = {
            **report.metrics,
            "label_guide": spec_of(model.label_guide, "label_guide"),
            "estimator": self.estimator,
            "mode": "semi-supervised" if self.semi else "conditional VAE (every example labelled)",
            "labels": self.n_l,
            "labels_per_class": counts.tolist(),
            "unlabelled": self.n_u,
            "alpha": self.alpha,
            "alpha_setting": cfg.alpha,
            "alpha_paper": self.alpha * (self.n_l + self.n_u),
            "best_epoch": int(best["epoch"]) if best else 0,
            "best_val_accuracy": best["val_accuracy"] if best else -1.0,
            "final_val_accuracy": history[-1]["val_accuracy"] if history else float("nan"),
            "epochs": cfg.epochs,
            "steps_per_epoch": self.steps_per_epoch(),
            "seconds_per_epoch": train_seconds / max(1, len(history)),
            "train_seconds": train_seconds,
            "prior": cfg.prior,
            "likelihood": cfg.likelihood,
            "binarization": "dynamic"
            if self.dynamic
            else ("static" if cfg.binarize == "static" else "none"),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "classifier_parameters": sum(p.numel() for p in model.label_guide.net.parameters()),
            "device": str(self.device),
            "data": ds.describe(),
        }
        metrics["confusion_matrix"] = metrics.pop("confusion_matrix")  # the long entry last
        if cfg.baseline == "supervised":
            metrics.update(self._train_baseline(class_names))
        return metrics

    def _train_baseline(self, class_names: list[str]) -> dict[str, Any]:  # pragma: no mutate block
        """The supervised baseline: the same classifier on the labelled subset alone."""
        from ..ssl import train_supervised

        cfg, ds = self.cfg, self.dataset
        pyro.set_rng_seed(cfg.seed + 7919)
        b_args = dict(cfg.label_guide_args)
        if cfg.baseline_dropout is not None:
            b_args["dropout"] = cfg.baseline_dropout
        baseline = build_component(
            cfg.label_guide,
            "label_guide",
            {
                "data_shape": ds.data_shape,
                "num_classes": self.num_classes,
                "hidden_dims": tuple(cfg.hidden_dims),
                "network": cfg.network,
            },
            b_args,
        ).to(self.device)
        history, b_epoch = train_supervised(
            baseline,
            self.x_l,
            self.y_l,
            self.val_x,
            ds.val_y,
            epochs=cfg.baseline_epochs or cfg.epochs,
            steps_per_epoch=self.steps_per_epoch(),
            batch_size=self.b_l,
            lr=cfg.baseline_lr or cfg.lr,
            dynamic=self.dynamic,
            seed=cfg.seed,
            patience=cfg.baseline_patience,
            clip_norm=cfg.clip_norm,
        )
        self.baseline, self.baseline_history = baseline, history
        test_x = self.test_x
        b_pred = torch.cat(
            [baseline(test_x[i : i + 1024]).argmax(-1) for i in range(0, len(test_x), 1024)]
        )
        b_conf = confusion_counts(b_pred, ds.test_y, self.num_classes)
        return {
            "baseline": "supervised: the same classifier trained on the labelled subset alone",
            "baseline_test_accuracy": float((b_pred == ds.test_y).float().mean()),
            "baseline_per_class_accuracy": per_class_accuracy(b_conf, class_names),
            "baseline_best_epoch": b_epoch,
            "baseline_best_val_accuracy": max(h["val_accuracy"] for h in history),
            "baseline_epochs_run": len(history),
            "baseline_seconds": sum(h["seconds"] for h in history),
            "baseline_settings": {
                "lr": cfg.baseline_lr or cfg.lr,
                "epochs": cfg.baseline_epochs or cfg.epochs,
                "dropout": b_args.get("dropout", 0.0),
                "patience": cfg.baseline_patience,
                "batch_size": self.b_l,
                "steps_per_epoch": self.steps_per_epoch(),
            },
        }

    def write_outputs(
        self, run_dir: Path, metrics: dict[str, Any]
    ) -> None:  # pragma: no mutate block
        if self.baseline_history:
            write_history_csv(run_dir / "baseline_history.csv", self.baseline_history)

    def figures(
        self, run_dir: Path, metrics: dict[str, Any], history: list[dict[str, float]]
    ) -> Sequence[Path]:  # pragma: no mutate block
        from ..figures import write_ssl_figures
        from ..ssl import SSLResult

        assert self.predictions is not None and self.confusion is not None
        result = SSLResult(
            self.model,
            self.cfg,
            self.dataset,
            history,
            metrics,
            self.labelled,
            self.unlabelled,
            run_dir,
            self.baseline,
            self.baseline_history,
        )
        return write_ssl_figures(
            result, self.test_x, self.predictions, self.confusion, progress=self.progress
        )
