"""Bad input, tried systematically; unsafe checkpoints; numerical faults.

Property tests (hypothesis, derandomised, no example database) feed ``ppl_vae.cli.main``
in-process with invalid command lines and config files: invalid values and wrong types for
every option, unknown flags and keys, missing files, unreadable data (random bytes as
``.npy``/``.npz``, pickled object arrays), mismatched shapes, misuse of ``--resume`` and of an
existing run directory. Each must end with exit code 2 and exactly one line on stderr that
starts ``ppl-vae`` and holds no traceback; no existing run directory may change (every file is
hashed before and after) and no new run directory may appear. An uncaught exception fails the
test with the input that caused it. Every input ends before training starts, so the examples
are cheap; the count tried is printed (``pytest -s``) and asserted.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import shutil
import string
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppl_vae import ConfigError, FitConfig, build_vae, fit, make_elbo
from ppl_vae.cli import build_parser, main
from ppl_vae.components import available
from ppl_vae.inference.estimators import estimator_names
from ppl_vae.inference.fastpath import build_loss
from ppl_vae.models.distributions.family import RAW_CLAMP
from ppl_vae.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

#: Valid, tiny settings that every fit command line starts with (faults come after and win).
TINY = [
    "--epochs",
    "1",
    "--hidden-dims",
    "8",
    "--latent-dim",
    "2",
    "--log-likelihood-samples",
    "2",
    "--max-train",
    "64",
    "--device",
    "cpu",
    "--quiet",
]
TRIED: Counter[str] = Counter()
SETTINGS = dict(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Env:
    """Run directories that bad input must leave alone, and a place for generated files."""

    root: Path
    run: Path
    tampered: Path
    good64: Path
    files: Path
    never: Path
    count: list[int] = field(default_factory=lambda: [0])

    def snapshot(self) -> dict[str, str]:
        out = {}
        for d in (self.run, self.tampered):
            for p in sorted(d.rglob("*")):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        return out

    def file(self, suffix: str) -> Path:
        self.count[0] += 1
        return self.files / f"f{self.count[0]}{suffix}"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("fuzz")
    run = root / "run"
    assert main(["fit", *TINY, "--epochs", "2", "--out", str(run)]) == 0
    tampered = root / "tampered"
    shutil.copytree(run, tampered)
    cfg = FitConfig.load(tampered / "config.toml")
    cfg.hidden_dims = [9]
    cfg.save(tampered / "config.toml")
    files = root / "files"
    files.mkdir()
    good64 = files / "good64.npy"
    np.save(good64, np.random.default_rng(0).random((40, 64)).astype(np.float32))
    yield Env(root, run, tampered, good64, files, root / "never")
    print(
        f"\nbad inputs tried: {sum(TRIED.values())} ({dict(TRIED)}); each exited 2 with one line "
        "on stderr and left every run directory unchanged"
    )


def expect_usage_error(env: Env, argv: list[str], kind: str) -> None:
    """``main(argv)`` exits 2 with one line on stderr and changes no run directory."""
    before = env.snapshot()
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code
    text = err.getvalue()
    lines = text.strip().splitlines()
    assert code == 2, f"{argv}: exit code {code}, stderr {text!r}"
    assert len(lines) == 1 and lines[0].startswith("ppl-vae"), f"{argv}: stderr {text!r}"
    assert "error" in lines[0] and "Traceback" not in text, f"{argv}: {text!r}"
    assert env.snapshot() == before, f"{argv} changed a run directory"
    assert not env.never.exists(), f"{argv} created a run directory"
    TRIED[kind] += 1


# -- strategies ------------------------------------------------------------------------------
WORDS = st.text(alphabet=string.ascii_letters + string.digits + "-_ .", max_size=12)


def _num(x: float) -> str:
    return repr(float(x))


NON_NUMBERS = st.sampled_from(["", "abc", "1e", "-", "one", "0x10", "[1]", "true", "1_0_"])
NON_POSITIVE_INTS = st.integers(max_value=0).map(str)
NON_INTS = st.one_of(NON_NUMBERS, st.floats(allow_nan=True).map(_num))
BAD_POSITIVE_FLOATS = st.one_of(  # for options that must be finite and > 0
    st.floats(max_value=0.0).map(_num),
    st.sampled_from(["nan", "inf", "-inf", "1e39", "1e308"]),
    st.floats(min_value=3.5e38, allow_infinity=False).map(_num),
    NON_NUMBERS,
)

ESTIMATOR_NAMES = estimator_names()


def _is_estimator(text: str) -> bool:
    """Whether the estimator parser accepts ``text`` (it ignores case and spaces)."""
    try:
        make_elbo(text, 1, None, max_plate_nesting=1)
    except ConfigError:
        return False
    return True


INT_OPTIONS = [
    "--epochs",
    "--batch-size",
    "--latent-dim",
    "--num-particles",
    "--log-likelihood-samples",
    "--max-train",
]


@st.composite
def bad_option_values(draw: st.DrawFn) -> list[str]:
    """One option with an invalid value (the rest of the command line is valid).

    Values are attached with ``=``, so that ``-inf`` or ``-5`` reach the option's own check
    rather than argparse's "expected one argument".
    """
    which = draw(
        st.sampled_from(
            ["int", "seed", "lr", "beta", "warmup", "clip", "choice", "name", "hidden", "arg"]
        )
    )
    if which == "int":
        flag = draw(st.sampled_from(INT_OPTIONS))
        return [f"{flag}={draw(st.one_of(NON_POSITIVE_INTS, NON_INTS))}"]
    if which == "seed":
        bad = st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32)).map(str)
        return [f"--seed={draw(st.one_of(bad, NON_INTS))}"]
    if which in ("lr", "beta"):
        return [f"--{which}={draw(BAD_POSITIVE_FLOATS)}"]
    if which == "warmup":
        bad = st.one_of(
            st.floats(max_value=-1e-300).map(_num),
            st.sampled_from(["nan", "inf", "-inf", "1e300"]),
            NON_NUMBERS,
        )
        return [f"--warmup-epochs={draw(bad)}"]
    if which == "clip":
        bad = st.one_of(st.floats(max_value=0.0).map(_num), st.just("nan"), NON_NUMBERS)
        return [f"--clip-norm={draw(bad)}"]
    if which == "choice":
        flag, choices = draw(
            st.sampled_from(
                [
                    ("--binarize", ("auto", "none", "static", "dynamic")),
                    ("--network", ("auto", "mlp", "conv")),
                    ("--device", ("auto", "cpu", "cuda")),
                ]
            )
        )
        return [f"{flag}={draw(WORDS.filter(lambda w: w not in choices))}"]
    if which == "name":
        flag, names = draw(
            st.sampled_from(
                [
                    ("--prior", available("prior")),
                    ("--likelihood", available("likelihood")),
                    ("--estimator", ESTIMATOR_NAMES),
                ]
            )
        )
        name = draw(
            st.one_of(
                WORDS.filter(lambda w: w not in names and not _is_estimator(w)),
                st.builds(  # a file that is not there, or a module that has no such class
                    "{}:{}".format,
                    st.sampled_from(["missing.py", "no/such/dir/x.py", "ppl_vae", "os.path"]),
                    st.sampled_from(["Prior", "VAE", "Thing", "join"]),
                ),
            )
        )
        if flag == "--estimator":
            name = draw(
                st.one_of(
                    st.just(name),
                    st.sampled_from(
                        ["iwae:0", "iwae:-2", "iwae:x", "iwae:1.5", "renyi:1", "renyi:nan"]
                    ),
                    st.sampled_from(["trace:3", "meanfield:1", "renyi:", "dreg:abc"]),
                )
            )
        return [f"{flag}={name}"]
    if which == "hidden":
        good = draw(st.lists(st.integers(1, 16).map(str), max_size=3))
        bad = draw(st.one_of(st.integers(max_value=0).map(str), NON_NUMBERS.filter(bool)))
        good.insert(draw(st.integers(0, len(good))), bad)
        return [f"--hidden-dims={','.join(good)}"]
    flag, known = draw(
        st.sampled_from(
            [("--prior-arg", {"learn_loc", "learn_scale"}), ("--likelihood-arg", set())]
        )
    )
    key = draw(st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True).filter(lambda k: k not in known))
    value = draw(st.sampled_from(["1", "true", "x", "[1,2]", "", "{}"]))
    return [flag, draw(st.sampled_from([f"{key}={value}", key, f"={value}"]))]


def _known_flags() -> set[str]:
    flags = set()
    for action in build_parser()._subparsers._group_actions[0].choices["fit"]._actions:
        flags.update(action.option_strings)
    return flags


KNOWN_FLAGS = _known_flags()


def _not_a_prefix(flag: str) -> bool:
    return not any(known.startswith(flag) for known in KNOWN_FLAGS)


UNKNOWN_FLAGS = st.from_regex(r"--[a-z][a-z-]{1,12}", fullmatch=True).filter(_not_a_prefix)


@settings(max_examples=400, **SETTINGS)
@given(fault=bad_option_values(), overwrite=st.booleans(), valid=st.booleans())
def _check_option_values(env: Env, fault: list[str], overwrite: bool, valid: bool) -> None:
    # Bad options with --overwrite on an existing run must still leave it alone.
    out = ["--out", str(env.run), "--overwrite"] if overwrite else ["--out", str(env.never)]
    extra = ["--estimator", "meanfield", "--beta", "0.5"] if valid else []
    expect_usage_error(env, ["fit", *TINY, *extra, *out, *fault], "option values")


def test_invalid_option_values(env: Env) -> None:
    _check_option_values(env)
    assert TRIED["option values"] >= 400


@settings(max_examples=80, **SETTINGS)
@given(flag=UNKNOWN_FLAGS, value=st.one_of(st.none(), WORDS))
def _check_unknown_flags(env: Env, flag: str, value: str | None) -> None:
    argv = ["fit", *TINY, "--out", str(env.never), flag, *([] if value is None else [value])]
    expect_usage_error(env, argv, "unknown flags")


def test_unknown_flags(env: Env) -> None:
    _check_unknown_flags(env)
    assert TRIED["unknown flags"] >= 80


# -- data files --------------------------------------------------------------------------------
@st.composite
def bad_data(draw: st.DrawFn, env: Env) -> list[str]:
    """``--data``/``--test-data`` that cannot be read or do not fit."""
    kind = draw(
        st.sampled_from(
            [
                "missing",
                "bytes.npy",
                "bytes.npz",
                "shape",
                "dtype",
                "object",
                "nonfinite",
                "mismatch",
            ]
        )
    )
    path = env.file(".npz" if kind == "bytes.npz" else ".npy")
    likelihood = ["--likelihood", "normal"]
    if kind == "missing":
        return ["--data", str(path), *likelihood]
    if kind.startswith("bytes"):
        head = draw(st.sampled_from([b"", b"\x93NUMPY\x01\x00", b"PK\x03\x04"]))
        path.write_bytes(head + draw(st.binary(max_size=300)))
        return ["--data", str(path), *likelihood]
    if kind == "shape":
        shape = draw(st.sampled_from([(), (7,), (0, 64), (3, 0), (2, 2, 2, 2, 2), (4, 5, 6, 7)]))
        np.save(path, np.zeros(shape, dtype=np.float32))
        return ["--data", str(path), *likelihood]
    if kind == "dtype":
        array = draw(
            st.sampled_from(
                [
                    np.array([["a"] * 4] * 3),
                    np.zeros((3, 4), dtype=np.complex64),
                    np.zeros((3, 4), dtype="datetime64[s]"),
                ]
            )
        )
        np.save(path, array)
        return ["--data", str(path), *likelihood]
    if kind == "object":
        np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
        return ["--data", str(path), *likelihood]
    x = np.random.default_rng(1).random((30, 64)).astype(np.float32)
    if kind == "nonfinite":
        x[draw(st.integers(0, 29)), draw(st.integers(0, 63))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf])
        )
        np.save(path, x)
        return ["--data", str(path), *likelihood]
    features = draw(st.integers(1, 100).filter(lambda d: d != 64))
    np.save(path, np.zeros((10, features), dtype=np.float32))
    return ["--data", str(env.good64), "--test-data", str(path), *likelihood]


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def _check_data(env: Env, data: st.DataObject) -> None:
    fault = data.draw(bad_data(env))
    expect_usage_error(env, ["fit", *TINY, "--out", str(env.never), *fault], "data files")


def test_unreadable_or_mismatched_data(env: Env) -> None:
    _check_data(env)
    assert TRIED["data files"] >= 150


# -- config files ------------------------------------------------------------------------------
def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


FIELD_TYPES = {f.name: str(f.type).replace(" | None", "") for f in fields(FitConfig)}
WRONG_VALUES = {  # per declared type, values of other types
    "int": ["ten", 1.5, True, [1], {"a": 1}],
    "float": ["fast", True, [0.1], {"a": 1.0}],
    "str": [3, 2.5, False, ["digits"], {"a": "b"}],
    "bool": ["yes", 1, 0.0, [True]],
    "list[int]": ["256,128", 64, [1.5], ["a"], [True]],
    "dict[str, Any]": ["x", 1, [1]],
}
OUT_OF_RANGE = [
    ("epochs", 0),
    ("batch_size", -1),
    ("latent_dim", 0),
    ("lr", -0.1),
    ("lr", math.inf),
    ("beta", 0.0),
    ("seed", -5),
    ("seed", 2**40),
    ("val_fraction", 1.5),
    ("test_fraction", 0.0),
    ("max_train", 0),
    ("hidden_dims", [0]),
    ("warmup_epochs", -1.0),
    ("clip_norm", 0.0),
    ("binarize", "sometimes"),
    ("device", "tpu"),
    ("log_likelihood_samples", 0),
    ("network", "transformer"),
    ("estimator", "trcae"),
    ("prior", "gausian"),
]


@st.composite
def bad_config(draw: st.DrawFn, env: Env) -> Path:
    kind = draw(st.sampled_from(["bytes", "unknown", "wrong type", "range", "not a table"]))
    suffix = draw(st.sampled_from([".toml", ".json"]))
    path = env.file(suffix)
    if kind == "bytes":  # a NUL byte outside a string is valid neither in TOML nor in JSON
        path.write_bytes(draw(st.binary(max_size=200)) + b"\n\x00")
        return path
    if kind == "not a table":
        path = path.with_suffix(".json")
        path.write_text(json.dumps(draw(st.sampled_from([[1, 2], 3, "epochs", None, True]))))
        return path
    if kind == "unknown":
        key = draw(st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True))
        items = {key if key not in FIELD_TYPES else key + "_x": 1}
    elif kind == "wrong type":
        name = draw(st.sampled_from(sorted(FIELD_TYPES)))
        items = {name: draw(st.sampled_from(WRONG_VALUES[FIELD_TYPES[name]]))}
    else:
        name, value = draw(st.sampled_from(OUT_OF_RANGE))
        items = {name: value}
    if path.suffix == ".json":
        path.write_text(json.dumps(items))
    else:
        path.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in items.items()))
    return path


@settings(max_examples=200, **SETTINGS)
@given(data=st.data())
def _check_config(env: Env, data: st.DataObject) -> None:
    path = data.draw(bad_config(env))
    if data.draw(st.booleans()):
        argv = ["fit", "--config", str(path), "--quiet", "--out", str(env.never)]
    else:  # a missing config file
        argv = ["fit", "--config", str(path.with_name("missing" + path.suffix)), "--quiet"]
    expect_usage_error(env, argv, "config files")


def test_bad_config_files(env: Env) -> None:
    _check_config(env)
    assert TRIED["config files"] >= 200


# -- existing runs: --resume, --overwrite, evaluate, sample --------------------------------------
@st.composite
def run_misuse(draw: st.DrawFn, env: Env) -> list[str]:
    run = str(env.run)
    kind = draw(st.sampled_from(["exists", "resume", "tampered", "evaluate", "sample", "file"]))
    if kind == "exists":  # a fresh fit into an existing run, without --overwrite or --resume
        return ["fit", *TINY, "--out", run, *draw(st.sampled_from([[], ["--seed", "3"]]))]
    if kind == "resume":
        change = draw(
            st.sampled_from(
                [
                    ["--epochs", "1"],  # fewer than the 2 the run has done
                    ["--epochs", "0"],
                    ["--lr", "0.1"],
                    ["--latent-dim", "4"],
                    ["--prior", "von-mises"],
                    ["--prior-arg", "learn_scale=true"],
                    ["--config", str(env.run / "config.toml")],
                    ["--overwrite"],
                    ["--device", "tpu"],
                ]
            )
        )
        return ["fit", "--out", draw(st.sampled_from([run, str(env.never)])), "--resume", *change]
    if kind == "tampered":  # its config builds a model its checkpoint does not fit
        return ["fit", "--out", str(env.tampered), "--resume", "--quiet"]
    if kind == "file":
        return ["fit", *TINY, "--out", str(env.good64)]
    target = draw(st.sampled_from([str(env.never), str(env.good64), str(env.files), run]))
    if kind == "evaluate":
        bad = draw(st.sampled_from([["--log-likelihood-samples", "0"], ["--device", "gpu"], []]))
        if target == run and not bad:
            bad = ["--log-likelihood-samples", "-1"]
        return ["evaluate", target, *bad]
    bad = draw(st.sampled_from([["-n", "0"], ["-n", "-3"], ["--out", "x.txt"], ["-n", "x"]]))
    return ["sample", target, *bad]


@settings(max_examples=60, **SETTINGS)
@given(data=st.data())
def _check_runs(env: Env, data: st.DataObject) -> None:
    expect_usage_error(env, data.draw(run_misuse(env)), "run directories")


def test_misuse_of_existing_runs(env: Env) -> None:
    _check_runs(env)
    assert TRIED["run directories"] >= 40  # hypothesis stops early once the space is exhausted


# -- component specs, component options, mismatched checkpoints ---------------------------
@pytest.mark.parametrize("spec", [":", ":Prior", ".rel:Prior"])
def test_component_spec_without_a_module_is_a_usage_error(env: Env, spec: str) -> None:
    expect_usage_error(env, ["fit", *TINY, "--out", str(env.never), "--prior", spec], "specs")


@pytest.mark.parametrize("value", ["7", "[1,2]", "maybe"])
def test_a_wrongly_typed_component_option_is_a_usage_error(
    env: Env, tmp_path: Path, value: str
) -> None:
    argv = ["fit", *TINY, "--out", str(tmp_path / "run"), "--prior-arg", f"learn_scale={value}"]
    expect_usage_error(env, argv, "component options")


def test_evaluating_a_mismatched_checkpoint_is_one_line(env: Env) -> None:
    expect_usage_error(env, ["evaluate", str(env.tampered)], "mismatched evaluate")


# -- safe loading --------------------------------------------------------------------------------
class _Payload:
    """Pickles as a call to ``Path.touch``: loading it unsafely would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_checkpoint_with_a_pickled_object_is_refused(env: Env, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(env.run, run)
    marker = tmp_path / "code-ran"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["payload"] = _Payload(marker)
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "best.pt"):  # evaluate reads best.pt
        torch.save(state, run / name)
    with pytest.raises(ConfigError, match=r"holds a pickled Python object .*refused"):
        load_checkpoint(run)
    for argv in (["evaluate", str(run)], ["fit", "--out", str(run), "--resume", "--quiet"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "weights_only=True" in err, err
    assert not marker.exists()


def test_out_of_memory_is_one_line(monkeypatch, capsys) -> None:
    def too_big(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. can't allocate memory")

    monkeypatch.setattr("ppl_vae.train.fit", too_big)
    assert main(["fit", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ppl-vae fit: error: out of memory") and len(err.splitlines()) == 1


# -- numerical faults ---------------------------------------------------------------------------
def test_gradient_clipping_bounds_every_update(monkeypatch) -> None:
    norms: list[float] = []
    step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"]]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    common = dict(epochs=1, hidden_dims=[16], latent_dim=2, log_likelihood_samples=2, quiet=True)
    fit(**common)
    unclipped = list(norms)
    norms.clear()
    clip = 0.5
    fit(clip_norm=clip, **common)
    assert min(unclipped) > 10 * clip  # the bound is active at every step here
    assert len(norms) == len(unclipped)
    assert max(norms) <= clip * (1 + 1e-5)  # clip_grad_norm_ rescales to clip / (norm + 1e-6)


@pytest.mark.parametrize("value", [1e6, 1e12, -1e12])
def test_a_huge_batch_value_cannot_make_the_scale_infinite(value: float) -> None:
    vae = build_vae((64,), likelihood="normal", latent_dim=3, hidden_dims=[16])
    loss = build_loss(make_elbo("trace", 1, None, max_plate_nesting=1), vae)
    x = torch.rand(8, 64)
    x[3, 5] = value
    q = vae.encode(x)
    scale = (q.base_dist.scale if hasattr(q, "base_dist") else q.scale).detach()
    assert torch.isfinite(scale).all() and float(scale.max()) <= math.exp(RAW_CLAMP) * 1.0001
    assert float(scale.min()) >= math.exp(-RAW_CLAMP) * 0.9999
    value_ = loss(x)
    assert torch.isfinite(value_)
    value_.backward()
    assert all(torch.isfinite(p.grad).all() for p in vae.parameters() if p.grad is not None)
