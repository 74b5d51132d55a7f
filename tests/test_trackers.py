"""TensorBoard and MLflow trackers, against the real libraries, writing into ``tmp_path`` only.

Each training test reads what the tracker wrote back through the library's own reader
(TensorBoard's ``EventAccumulator``, MLflow's ``MlflowClient``) and compares it with the run's
history: TensorBoard stores scalars as float32, so those must equal the history rounded to
float32; MLflow stores doubles, so those must be equal.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

import ppl_vae
from ppl_vae import ConfigError
from ppl_vae.training import Callback, TrainingError
from ppl_vae.training.trackers import (
    TRACKER_SPECS,
    MLflowTracker,
    TensorBoardTracker,
    make_tracker,
)

# The one library warning these tests meet (MLflow 3.17's SQLite store on SQLAlchemy 2.1).
pytestmark = pytest.mark.filterwarnings(
    "ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning"
)

FIT = {"epochs": 2, "max_train": 64, "log_likelihood_samples": 5, "quiet": True, "overwrite": True}
FIGURES = {"elbo", "interpolation", "latent", "reconstructions", "samples", "traversals_z",
           "posterior_z", "kl_per_dimension"}  # fmt: skip


def mlflow_client(tracker: MLflowTracker):
    """A client of the tracker's store; imported late, so the tracker has turned telemetry off."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracker.tracking_uri_used)


def read_events(log_dir: Path) -> event_accumulator.EventAccumulator:
    """Every scalar, image and text event in ``log_dir`` (no sampling)."""
    acc = event_accumulator.EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0}
    )
    acc.Reload()
    return acc


def assert_scalars_match(acc, history: list[dict[str, float]]) -> None:
    """Every numeric history column but ``epoch`` is a scalar, one per epoch, equal in float32."""
    for key in history[0]:
        if key == "epoch":
            continue
        events = acc.Scalars(key)
        assert [e.step for e in events] == [int(h["epoch"]) for h in history], key
        for e, h in zip(events, history):
            expected = float(np.float32(h[key]))
            assert e.value == expected or (np.isnan(e.value) and np.isnan(expected)), (key, e, h)


@pytest.mark.slow
def test_tensorboard_logs_history_metrics_config_and_figures(tmp_path: Path) -> None:
    tracker = TensorBoardTracker()
    result = ppl_vae.fit(out=tmp_path / "run", callbacks=[tracker], **FIT)

    assert tracker.path == tmp_path / "run" / "tensorboard"
    assert tracker.writer is None  # closed at the end of the run
    acc = read_events(tracker.path)
    assert_scalars_match(acc, result.history)
    assert "epoch" not in acc.Tags()["scalars"]
    # test metrics at the last epoch's step, nested dicts joined with "/"
    (test_elbo,) = acc.Scalars("test_elbo")
    assert test_elbo.step == 2
    assert test_elbo.value == float(np.float32(result.metrics["test_elbo"]))
    assert any(t.startswith("data/") for t in acc.Tags()["scalars"])
    # every figure, as a PNG-encoded image of the right size
    images = {t.removeprefix("figures/") for t in acc.Tags()["images"]}
    assert images == FIGURES == {Path(p).stem for p in result.metrics["figures"]}
    (samples,) = acc.Images("figures/samples")
    assert samples.step == 2 and samples.encoded_image_string.startswith(b"\x89PNG")
    from matplotlib.image import imread

    height, width = imread(tmp_path / "run" / "figures" / "samples.png").shape[:2]
    assert (samples.height, samples.width) == (height, width)
    # the config: hparams with the test metrics, and a text summary
    content = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(content)
    (text,) = acc.Tensors("config/text_summary")
    assert "latent_dim = 10" in text.tensor_proto.string_val[0].decode()


@pytest.mark.slow
def test_mlflow_logs_params_metrics_and_artifacts(tmp_path: Path) -> None:
    tracker = MLflowTracker(run_name="tiny")
    result = ppl_vae.fit(out=tmp_path / "run", callbacks=[tracker], **FIT)

    db = (tmp_path / "run" / "mlruns" / "mlflow.db").resolve()
    assert tracker.tracking_uri_used == f"sqlite:///{db.as_posix()}"
    client = mlflow_client(tracker)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tiny"
    assert client.get_experiment(run.info.experiment_id).name == "ppl-vae"
    assert run.data.tags["ppl_vae.kind"] == "vae"
    # params: the flattened config as text
    assert run.data.params["latent_dim"] == str(result.config.latent_dim)
    assert run.data.params["hidden_dims"] == "[256, 128]"
    assert run.data.params["clip_norm"] == "null"
    # per-epoch metrics, one per step, exactly the history
    for key in ("train_loss", "val_elbo", "kl_scale", "seconds"):
        hist = sorted(client.get_metric_history(tracker.run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in hist] == [
            (int(h["epoch"]), h[key]) for h in result.history
        ], key
    assert "epoch" not in run.data.metrics
    assert run.data.metrics["test_elbo"] == result.metrics["test_elbo"]
    (test_ll,) = client.get_metric_history(tracker.run_id, "test_log_likelihood")
    assert test_ll.step == 2
    # artifacts: the figures and the run directory's files, under the run directory
    top = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert top == {"config.toml", "history.csv", "metrics.json", "figures"}
    figures = {Path(a.path).stem for a in client.list_artifacts(tracker.run_id, "figures")}
    assert figures == FIGURES
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to((tmp_path / "run" / "mlruns").resolve())


@pytest.mark.slow
def test_tensorboard_resume_replaces_the_repeated_epoch(tmp_path: Path) -> None:
    out = tmp_path / "run"
    ppl_vae.fit(out=out, callbacks=[TensorBoardTracker()], figures=False, **FIT)
    # As if killed after epoch 2 was logged but before its checkpoint: epoch 2 runs again.
    (out / "checkpoint.prev.pt").replace(out / "checkpoint.pt")
    tracker = TensorBoardTracker()
    result = ppl_vae.fit(out=out, resume=True, epochs=2, quiet=True, callbacks=[tracker])

    assert len(list(tracker.path.glob("events.out.tfevents.*"))) == 2
    acc = read_events(tracker.path)
    assert_scalars_match(acc, result.history)  # one point per epoch: the resumed run's
    assert [e.step for e in acc.Scalars("test_elbo")] == [2]


class FailAfterFirstEpoch(Callback):
    def on_epoch_end(self, trainer, epoch, row):
        raise RuntimeError("a later callback failed")


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["callback", "nonfinite"])
def test_failed_run_ends_mlflow_failed_and_closes_tensorboard(tmp_path: Path, failure: str) -> None:
    tb, ml = TensorBoardTracker(), MLflowTracker()
    if failure == "callback":  # after epoch 1 was logged
        options, callbacks, error = {}, [tb, ml, FailAfterFirstEpoch()], RuntimeError
    else:  # lr=1e30 makes the second step's loss non-finite, before any epoch ends
        options, callbacks, error = {"lr": 1e30, "max_train": 512}, [tb, ml], TrainingError
    with pytest.raises(error):
        ppl_vae.fit(out=tmp_path / "run", callbacks=callbacks, figures=False, **{**FIT, **options})

    assert tb.writer is None
    acc = read_events(tb.path)
    client = mlflow_client(ml)
    run = client.get_run(ml.run_id)
    assert run.info.status == "FAILED"
    artifacts = {a.path for a in client.list_artifacts(ml.run_id)}
    assert "config.toml" in artifacts and "metrics.json" not in artifacts
    if failure == "callback":
        # epoch 1 was flushed to the event file and logged to MLflow; nothing of an evaluation
        (val_elbo,) = acc.Scalars("val_elbo")
        assert val_elbo.step == 1
        assert [m.step for m in client.get_metric_history(ml.run_id, "val_elbo")] == [1]
        assert "test_elbo" not in acc.Tags()["scalars"]
    else:
        assert acc.Tags()["scalars"] == []
        assert run.data.metrics == {}


@pytest.mark.slow
def test_tensorboard_logs_the_m2_kind(tmp_path: Path) -> None:
    tracker = TensorBoardTracker(log_dir=tmp_path / "tb")
    result = ppl_vae.fit_ssl(
        labels=20,
        epochs=1,
        max_train=200,
        elbo_samples=2,
        quiet=True,
        out=tmp_path / "run",
        callbacks=[tracker],
    )

    acc = read_events(tmp_path / "tb")
    assert "val_accuracy" in acc.Tags()["scalars"]
    assert_scalars_match(acc, result.history)
    (accuracy,) = acc.Scalars("test_accuracy")
    assert accuracy.value == float(np.float32(result.metrics["test_accuracy"]))
    assert not (tmp_path / "run" / "tensorboard").exists()


@pytest.mark.parametrize("tracker", [TensorBoardTracker, MLflowTracker])
def test_tracker_without_a_place_to_write_is_a_config_error(tracker) -> None:
    with pytest.raises(ConfigError, match="nowhere to") as info:
        ppl_vae.fit(epochs=1, max_train=64, quiet=True, figures=False, callbacks=[tracker()])
    assert "\n" not in str(info.value)


def test_make_tracker_parses_its_specs(tmp_path: Path) -> None:
    tb = make_tracker(f"tensorboard:{tmp_path / 'tb'}")
    assert isinstance(tb, TensorBoardTracker) and tb.log_dir == tmp_path / "tb"
    assert isinstance(make_tracker("tensorboard"), TensorBoardTracker)
    uri = f"sqlite:///{(tmp_path / 'runs.db').as_posix()}"
    ml = make_tracker(f"mlflow:{uri}")
    assert isinstance(ml, MLflowTracker) and ml.tracking_uri == uri
    assert make_tracker("mlflow").tracking_uri is None


@pytest.mark.parametrize("spec", ["tensorbaord", "wandb:x", "", "MLflow"])
def test_make_tracker_unknown_name_lists_the_choices(spec: str) -> None:
    with pytest.raises(ConfigError, match="Unknown tracker") as info:
        make_tracker(spec)
    message = str(info.value)
    assert "\n" not in message and all(s in message for s in TRACKER_SPECS)


@pytest.mark.parametrize("spec", ["tensorboard:", "mlflow:"])
def test_make_tracker_empty_argument(spec: str) -> None:
    with pytest.raises(ConfigError, match="nothing after ':'"):
        make_tracker(spec)


@pytest.mark.parametrize(
    ("spec", "module", "extra"),
    [("mlflow", "mlflow", "mlflow"), ("tensorboard", "tensorboard", "tensorboard")],
)
def test_make_tracker_missing_package_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, spec: str, module: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # "import mlflow" now fails
    with pytest.raises(ConfigError) as info:
        make_tracker(spec)
    message = str(info.value)
    assert f'pip install "ppl-vae[{extra}]"' in message and "\n" not in message


def test_mlflow_tracker_turns_telemetry_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    MLflowTracker()
    import os

    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    from mlflow.telemetry.utils import is_telemetry_disabled

    assert is_telemetry_disabled()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"experiment": ""}, "`experiment`"), ({"tracking_uri": ""}, "`tracking_uri`")],
)
def test_mlflow_tracker_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MLflowTracker(**kwargs)


def test_mlflow_keys_and_long_params() -> None:
    from ppl_vae.training.trackers.mlflow import MAX_PARAM_LENGTH, mlflow_key, param_value

    assert mlflow_key("per_class_accuracy/T-shirt(top)") == "per_class_accuracy/T-shirt_top_"
    assert mlflow_key("a//b/../c") == "a/_/b/_/c"
    long = param_value(list(range(5000)))
    assert len(long) == MAX_PARAM_LENGTH and long.endswith("...")
    assert param_value(None) == "null" and param_value("x") == "x"


def test_import_ppl_vae_needs_no_tracker_library() -> None:
    code = (
        "import sys, ppl_vae, ppl_vae.training.trackers; "
        "loaded = [m for m in ('mlflow', 'tensorboard') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_cli_log_flag_writes_tensorboard_events_for_fit_and_ssl(tmp_path):
    from ppl_vae.cli import main

    common = ["--epochs", "1", "--max-train", "200", "--quiet", "--log", "tensorboard"]
    assert main(["fit", *common, "--log-likelihood-samples", "2", "--out", str(tmp_path / "f")]) == 0
    assert main(["ssl", *common, "--labels", "20", "--elbo-samples", "2",
                 "--out", str(tmp_path / "s")]) == 0  # fmt: skip
    for run in ("f", "s"):
        assert list((tmp_path / run / "tensorboard").glob("events.out.tfevents.*")), run
    assert main(["fit", "--log", "tensorbaord", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
