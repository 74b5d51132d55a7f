r"""Run configuration: one dataclass, validated, round-tripping through TOML and JSON.

``ppl-vae fit --config RUN_DIR/config.toml`` reproduces a run. Configs are data, never pickles.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .models.errors import ConfigError

if TYPE_CHECKING:
    from typing_extensions import Self

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

BINARIZE = ("auto", "none", "static", "dynamic")
DEVICES = ("auto", "cpu", "cuda")
#: The largest float32: parameters are float32, so larger rates and weights overflow them.
FLOAT32_MAX = 3.4028234663852886e38
#: Budgets no run can finish are refused rather than started: a million passes over the data is
#: 300 times the longest schedule in the VAE literature we follow (Burda et al.: 3,280 epochs),
#: and a million importance samples per point 200 times their K = 5,000.
MAX_EPOCHS = 1_000_000
MAX_IMPORTANCE_SAMPLES = 1_000_000


class ConfigFile:
    """Round trips of a config dataclass through dicts, TOML and JSON (never pickles).

    Subclasses are dataclasses that validate in ``__post_init__``; ``_toml_header`` is the first
    line of the TOML file. Integers given for ``float`` fields are converted; tuples for list
    fields become lists; unknown keys are an error naming the known ones.
    """

    _toml_header = "# ppl-vae configuration"
    #: The command that trains runs of this config (``fit``, ``ssl``).
    command: ClassVar[str] = "fit"
    #: The model kinds this config class describes; the first is the default.
    kinds: ClassVar[tuple[str, ...]] = ()
    #: Config class of every kind (filled as subclasses are defined).
    by_kind: ClassVar[dict[str, type[ConfigFile]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for kind in cls.kinds:
            ConfigFile.by_kind[kind] = cls

    @property
    def kind(self) -> str:
        """The model kind this config trains (recorded as ``kind`` in ``config.toml``)."""
        return self.kinds[0]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> Self:
        known = {f.name: str(f.type) for f in fields(cls)}  # type: ignore[arg-type]
        d = dict(d)
        kind = d.pop("kind", None)
        if kind is not None and kind not in cls.kinds:
            other = ConfigFile.by_kind.get(kind) if isinstance(kind, str) else None
            hint = f" (`ppl-vae {other.command} --config`)" if other is not None else ""
            raise ConfigError(
                f"{source}: a config of model kind {kind!r}{hint}, but `ppl-vae {cls.command}` "
                f"trains kinds {list(cls.kinds)}"
            )
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {unknown}; known: {sorted(known)}")
        for name, value in d.items():
            hint = known[name]
            if hint.startswith("list") and isinstance(value, tuple):
                d[name] = list(value)
            elif "float" in hint and isinstance(value, int) and not isinstance(value, bool):
                d[name] = float(value)
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_toml(self) -> str:
        lines = [self._toml_header, f"kind = {_toml_value(self.kind)}"]
        for key, value in self.to_dict().items():
            if value is None:
                lines.append(f"# {key} = (unset)")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> None:
        """Write TOML (``.toml``) or JSON (anything else), atomically."""
        path = Path(path)
        if path.suffix == ".toml":
            text = self.to_toml()
        else:
            text = json.dumps({"kind": self.kind, **self.to_dict()}, indent=2)
        write_text_atomic(path, text)

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Read a TOML or JSON config file."""
        return cls.from_dict(read_config_table(path), source=str(path))


def read_config_table(path: str | Path) -> dict[str, Any]:
    """The table of options in a TOML or JSON config file, as a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = path.read_bytes()
        d = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"could not parse config file {str(path)!r}: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a table of options")
    return d


def run_kind(path: str | Path) -> str:
    """The model kind a config file records (files written before kinds were recorded: ``m2``
    for an ``ppl-vae ssl`` config, recognised by its header line, else ``vae``)."""
    d = read_config_table(path)
    kind = d.get("kind")
    if kind is None:
        first = Path(path).read_text(encoding="utf-8").split("\n", 1)[0]
        kind = "m2" if first.startswith("# ppl-vae ssl configuration") else "vae"
    if not isinstance(kind, str) or kind not in ConfigFile.by_kind:
        raise ConfigError(
            f"config file {str(path)!r} records model kind {kind!r}; known kinds: "
            f"{sorted(ConfigFile.by_kind)}"
        )
    return kind


def load_run_config(path: str | Path) -> ConfigFile:
    """A run's config file, read with the config class of the kind it records."""
    return ConfigFile.by_kind[run_kind(path)].load(path)


@dataclass
class RunConfig(ConfigFile):
    """The options every training command shares, declared and validated once.

    :class:`FitConfig` (``ppl-vae fit``: the VAE or a user's pair) and
    :class:`~ppl_vae.ssl.SSLConfig` (``ppl-vae ssl``: M2) add their own fields and may change a
    shared field's default.
    """

    # data
    data: str = "digits"
    test_data: str | None = None  # a fixed test file instead of a split of the data
    data_root: str | None = None
    download: bool = False
    binarize: str = "auto"
    max_train: int | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    # the data split (and M2's labelled subset, a fixed binarisation of the evaluation data);
    # None: the run's `seed`, so one seed fixes everything
    data_seed: int | None = None
    # model components (the built-in models)
    prior: str = "gaussian"
    prior_args: dict[str, Any] = field(default_factory=dict)
    likelihood: str = "bernoulli"
    likelihood_args: dict[str, Any] = field(default_factory=dict)
    latent_dim: int = 10
    hidden_dims: list[int] = field(default_factory=lambda: [256, 128])
    network: str = "auto"
    encoder: str | None = None
    encoder_args: dict[str, Any] = field(default_factory=dict)
    decoder: str | None = None
    decoder_args: dict[str, Any] = field(default_factory=dict)
    guide_family: str | None = None  # q(z|x)'s family (e.g. "iaf"); None: the prior's own
    guide_family_args: dict[str, Any] = field(default_factory=dict)
    # optimisation
    num_particles: int = 1
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    lr_schedule: str | None = None  # a torch.optim.lr_scheduler class, stepped once per epoch
    lr_schedule_args: dict[str, Any] = field(default_factory=dict)
    clip_norm: float | None = None
    patience: int | None = None  # early stopping: epochs without a better validation metric
    # evaluation
    latent_diagnostics: bool = True  # per-epoch KL per dimension, recon term, active units
    # execution
    device: str = "auto"
    seed: int = 0

    @property
    def split_seed(self) -> int:
        """The seed of the data split: ``data_seed``, else ``seed``."""
        return self.seed if self.data_seed is None else self.data_seed

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check types and ranges; raise :class:`ConfigError` naming the field and the value."""
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), str(f.type))
        if self.binarize not in BINARIZE:
            raise ConfigError(f"`binarize` must be one of {list(BINARIZE)}, got {self.binarize!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"`device` must be one of {list(DEVICES)}, got {self.device!r}")
        _positive(self, "latent_dim", "num_particles", "epochs", "batch_size", "lr")
        if self.epochs > MAX_EPOCHS:
            raise ConfigError(
                f"`epochs` = {self.epochs} cannot finish; at most {MAX_EPOCHS:,} passes are "
                "accepted (the longest published schedules are a few thousand)"
            )
        if not self.lr <= FLOAT32_MAX:
            raise ConfigError(f"`lr` must be a finite number > 0, got {self.lr}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"`seed` must be an integer in [0, 2**32), got {self.seed}")
        if self.data_seed is not None and not 0 <= self.data_seed < 2**32:
            raise ConfigError(f"`data_seed` must be an integer in [0, 2**32), got {self.data_seed}")
        if self.max_train is not None and self.max_train <= 0:
            raise ConfigError(f"`max_train` must be positive, got {self.max_train}")
        if any(h <= 0 for h in self.hidden_dims):
            raise ConfigError(f"`hidden_dims` must be positive integers, got {self.hidden_dims}")
        # inf is allowed: the norm is measured, nothing is clipped
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"`clip_norm` must be positive, got {self.clip_norm}")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(
                f"`patience` must be a positive number of epochs, got {self.patience}"
            )
        _check_split_fractions(self.val_fraction, self.test_fraction)


@dataclass
class FitConfig(RunConfig):
    """Everything that defines a ``ppl-vae fit`` run: the shared options of :class:`RunConfig`
    plus the test file, a user's own model, the estimator, the KL schedule and evaluation.
    Every field has a default (digits, Gaussian VAE)."""

    _toml_header = (
        "# ppl-vae run configuration; `ppl-vae fit --config THIS_FILE` reproduces the run"
    )
    kinds = ("vae", "user")

    # model: a user's own model/guide pair (kind "user") instead of the built-in VAE
    model: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    # objective
    estimator: str = "trace"
    vectorize_particles: bool | None = None  # None: the estimator's default (iwae/dreg: yes)
    beta: float = 1.0
    warmup_epochs: float = 0.0
    # the KL weight's shape: "linear" (warm-up), "cyclical", or "file.py:function"
    beta_schedule: str = "linear"
    beta_schedule_args: dict[str, Any] = field(default_factory=dict)
    free_bits: float = 0.0  # a KL floor in nats per latent dimension (Kingma et al. 2016)
    # evaluation
    log_likelihood_samples: int = 1000
    log_likelihood_chunk: int = 100
    # memory budget of the importance-sampling chunks ("512MiB", "1GB", bytes); the chunk
    # shrinks to fit it (ppl_vae.inference.scoring)
    eval_memory: str = "512MiB"
    figure_draws: bool = False  # figures show draws x ~ p(x|z) instead of E[x|z]

    @property
    def kind(self) -> str:
        """``"user"`` when ``model`` names a user's model/guide pair, else ``"vae"``."""
        return "user" if self.model is not None else "vae"

    def validate(self) -> None:
        """Check types and ranges; raise :class:`ConfigError` naming the field and the value."""
        super().validate()
        _positive(self, "log_likelihood_samples", "log_likelihood_chunk")
        from .inference.scoring import parse_memory

        parse_memory(self.eval_memory)  # a one-line ConfigError for a bad size
        if self.log_likelihood_samples > MAX_IMPORTANCE_SAMPLES:
            raise ConfigError(
                f"`log_likelihood_samples` = {self.log_likelihood_samples} cannot finish; at most "
                f"{MAX_IMPORTANCE_SAMPLES:,} importance samples per point are accepted "
                "(Burda et al. use 5,000)"
            )
        if not 0 < self.beta <= FLOAT32_MAX:
            raise ConfigError(f"`beta` must be a finite number > 0, got {self.beta}")
        if not 0 <= self.warmup_epochs <= FLOAT32_MAX:
            raise ConfigError(f"`warmup_epochs` must be >= 0, got {self.warmup_epochs}")
        if not 0 <= self.free_bits <= FLOAT32_MAX:
            raise ConfigError(f"`free_bits` must be a finite number >= 0, got {self.free_bits}")
        if self.beta_schedule not in ("linear", "cyclical") and ":" not in self.beta_schedule:
            raise ConfigError(
                f"`beta_schedule` must be 'linear', 'cyclical', 'file.py:function' or "
                f"'package.module:function', got {self.beta_schedule!r}"
            )


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace``."""
    import os

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, a kill: no temporary file is left behind
        tmp.unlink(missing_ok=True)
        raise


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        items = [f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items() if x is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise ConfigError(f"cannot write {v!r} ({type(v).__name__}) to a config file")


def _check_type(name: str, value: Any, hint: str) -> None:
    optional = "None" in hint
    if value is None:
        if optional:
            return
        raise ConfigError(f"`{name}` must be set, got None")
    base = hint.replace(" | None", "")
    ok = {
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "list[int]": isinstance(value, list)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
        "dict[str, Any]": isinstance(value, dict),
    }.get(base, True)
    if not ok:
        raise ConfigError(f"`{name}` must be {base}, got {value!r} ({type(value).__name__})")


def _check_split_fractions(val_fraction: float, test_fraction: float) -> None:
    """Validation and test fractions each in (0, 1), leaving a training split."""
    for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < v < 1:
            raise ConfigError(f"`{name}` must be in (0, 1), got {v}")
    if val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"`val_fraction` + `test_fraction` must be < 1, got {val_fraction} + {test_fraction}"
        )


def _positive(cfg: Any, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        if not v > 0:
            raise ConfigError(f"`{name}` must be positive, got {v}")


#: ``alpha = "auto"``: the classification weight is this many times the number of dimensions D of
#: what M2 models (pixels, or M1's codes). Why D: the unlabelled bound trains q(y|x) through the
#: differences of -L(x, y) between classes, which grow with the bound's magnitude and so with D
#: (64 pixels of digits: about 90 nats a point; 196 pixels of 8-bit images: about 680), while
#: -log q(y|x) stays of order log K; a weight proportional to D keeps the two in proportion.
#: The factor was chosen on validation accuracy of both data sets of
#: ``benchmarks/ssl_defaults.py --tune`` (tuning seeds only).
ALPHA_PER_DIMENSION = 1.0


def resolve_alpha(alpha: float | str, data_shape: Sequence[int]) -> float:
    """The classification weight ``alpha`` of a run: a number as given, ``"auto"`` from D."""
    if alpha == "auto":
        return ALPHA_PER_DIMENSION * math.prod(data_shape)
    return float(alpha)


#: The baselines ``ppl-vae ssl`` can train beside M2.
BASELINES = ("supervised",)


@dataclass
class SSLConfig(RunConfig):
    r"""Everything that defines a semi-supervised run; every field has a default (digits, M2).

    The options every training command shares are those of :class:`~ppl_vae.config.RunConfig`
    (defaults changed here: ``likelihood="auto"``, ``latent_dim=16``, ``epochs=100``). The
    fields of M2:

    Attributes:
        labels: number of labelled training examples (class-balanced, chosen by ``data_seed``), or
            ``"all"`` for a conditional VAE on fully labelled data.
        num_classes: K; ``None`` takes the data set's.
        svhn_extra: append SVHN's ``extra`` split (531,131 images) to the training set.
        features: a VAE run directory (``ppl-vae fit``): M1+M2, M2 trained on that run's codes
            of its own data and split (:mod:`ppl_vae.runs.features`); the data options then
            come from that run.
        features_mode: ``"mean"`` (posterior means) or ``"sample"`` (one draw per point).
        label_guide: the strategy for unobserved labels: ``enumerate``, ``relaxed``, ``sample`` or
            ``file.py:Class``.
        label_guide_args: options of the label guide (``hidden_dims``, ``dropout``,
            ``initial_temperature``, ...).
        alpha: weight of the classification loss, :math:`\alpha_\text{paper}/N` (:mod:`ppl_vae.ssl`
            docstring), so each labelled point's :math:`-\log q(y|x)` weighs :math:`\alpha N / N_l`
            against its bound; ``"auto"`` (the default) is :data:`ALPHA_PER_DIMENSION` times the
            number of dimensions D of the data M2 models (64 for digits). Kingma et al. use 0.1
            (on binarised MNIST, whose bound is about 100 nats a point); with the discretised
            logistic likelihood on 8-bit or 17-level pixels that weight leaves q(y|x) at 0.40
            validation accuracy on 14x14 Fashion-MNIST with 100 labels, where D gives 0.75
            (``benchmarks/ssl_defaults.py``).
        class_probs: :math:`\pi` of :math:`p(y)`; empty for uniform.
        estimator: the ELBO estimator of both bounds (``ppl_vae.make_elbo`` spec: ``trace``,
            ``meanfield``, ``iwae:5``, ...); ``None`` (the default) takes the label guide's own
            (``enum`` for ``enumerate``, ``trace`` for ``relaxed``, ``tracegraph`` for
            ``sample``). Only ``enum`` trains an enumerating guide, and only such a guide.
        likelihood: a likelihood name, or ``"auto"``: ``discretized-logistic`` for quantised
            data with more than two levels (8-bit images, digits), ``bernoulli`` for binary data,
            ``continuous-bernoulli`` for other data in [0, 1], else ``normal``.
        labelled_batch_size: labelled points per step (default ``batch_size``, at most the
            number of labels).
        elbo_samples: z samples per class for the test ELBO.
        baseline: ``"supervised"`` also trains the same classifier on the labelled subset alone.
        baseline_patience: stop the baseline after this many epochs without a better
            validation accuracy (``None``: train the whole budget); its best epoch is kept.
        baseline_lr: the baseline's Adam learning rate (``None``: ``lr``).
        baseline_epochs: the baseline's budget in epochs of ``steps_per_epoch`` labelled
            mini-batches (``None``: ``epochs``).
        baseline_dropout: the baseline classifier's dropout (``None``: that of
            ``label_guide_args``, default 0). The baseline has its own optimisation settings so
            that it can be tuned on validation accuracy as the M2 model is, rather than
            inheriting the M2 model's.
    """

    _toml_header = (
        "# ppl-vae ssl configuration; `ppl-vae ssl --config THIS_FILE` reproduces the run"
    )
    command = "ssl"
    kinds = ("m2",)

    # shared fields with other defaults
    likelihood: str = "auto"
    latent_dim: int = 16
    epochs: int = 100
    # data
    svhn_extra: bool = False
    labels: int | str = 100
    num_classes: int | None = None
    # M1+M2: train on the codes of this VAE run (its data and split) instead of the data
    features: str | None = None
    features_mode: str = "mean"  # "mean": E_q[z|x]; "sample": one draw per point
    # model
    label_guide: str = "enumerate"
    label_guide_args: dict[str, Any] = field(default_factory=dict)
    alpha: float | str = "auto"
    class_probs: list[float] = field(default_factory=list)
    estimator: str | None = None
    # optimisation
    labelled_batch_size: int | None = None
    # evaluation
    elbo_samples: int = 10
    baseline: str | None = None
    baseline_patience: int | None = None
    baseline_lr: float | None = None
    baseline_epochs: int | None = None
    baseline_dropout: float | None = None

    def validate(self) -> None:
        """Check types and ranges; raise :class:`ConfigError` naming the field and the value."""
        super().validate()
        if isinstance(self.labels, bool) or not (
            (isinstance(self.labels, int) and self.labels > 0) or self.labels == "all"
        ):
            raise ConfigError(f"`labels` must be a positive integer or 'all', got {self.labels!r}")
        if not self.elbo_samples > 0:
            raise ConfigError(f"`elbo_samples` must be positive, got {self.elbo_samples}")
        for name in ("num_classes", "labelled_batch_size", "baseline_patience", "baseline_epochs"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"`{name}` must be positive, got {v}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ConfigError(f"`num_classes` must be at least 2, got {self.num_classes}")
        if self.features_mode not in ("mean", "sample"):
            raise ConfigError(
                f"`features_mode` must be 'mean' or 'sample', got {self.features_mode!r}"
            )
        if self.features is not None:
            default = type(self)()
            data_fields = ("data", "test_data", "data_root", "download", "binarize", "max_train",
                           "val_fraction", "test_fraction", "svhn_extra")  # fmt: skip
            given = [f for f in data_fields if getattr(self, f) != getattr(default, f)]
            if given:
                raise ConfigError(
                    f"with `features` the data and their split are those of the run "
                    f"{self.features!r}; drop {sorted(given)}"
                )
        if self.baseline_lr is not None and not 0 < self.baseline_lr <= FLOAT32_MAX:
            raise ConfigError(f"`baseline_lr` must be a finite number > 0, got {self.baseline_lr}")
        if self.baseline_dropout is not None and not 0 <= self.baseline_dropout < 1:
            raise ConfigError(
                f"`baseline_dropout` must be a number in [0, 1), got {self.baseline_dropout}"
            )
        if self.alpha != "auto" and (
            isinstance(self.alpha, bool | str) or not 0 <= self.alpha <= FLOAT32_MAX
        ):
            raise ConfigError(f"`alpha` must be a finite number >= 0 or 'auto', got {self.alpha!r}")
        if self.class_probs:
            ok = all(
                isinstance(p, int | float) and not isinstance(p, bool) and p > 0
                for p in self.class_probs
            )
            if not ok or not math.isclose(sum(self.class_probs), 1.0, abs_tol=1e-6):
                raise ConfigError(
                    "`class_probs` must be positive numbers summing to 1 (or empty for uniform), "
                    f"got {self.class_probs}"
                )
        if self.baseline is not None and self.baseline not in BASELINES:
            raise ConfigError(f"`baseline` must be one of {list(BASELINES)}, got {self.baseline!r}")
