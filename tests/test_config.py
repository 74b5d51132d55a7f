"""Configs round-trip through TOML and JSON and reject bad values with the field named."""

from __future__ import annotations

import pytest

from ppl_vae import ConfigError, FitConfig


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_round_trip(tmp_path, suffix):
    cfg = FitConfig(
        prior="von-mises",
        prior_args={"concentration": 2.0, "learn_loc": True},
        hidden_dims=[],
        test_data="x y/é.npy",
        clip_norm=5.0,
        beta=0.5,
    )
    path = tmp_path / f"config{suffix}"
    cfg.save(path)
    assert FitConfig.load(path) == cfg


def test_default_config_round_trips_with_unset_fields(tmp_path):
    cfg = FitConfig()
    cfg.save(tmp_path / "c.toml")
    assert FitConfig.load(tmp_path / "c.toml") == cfg


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "`epochs` must be positive, got 0"),
        ("lr", -1.0, "`lr` must be positive"),
        ("latent_dim", "3", "`latent_dim` must be int, got '3'"),
        ("binarize", "maybe", "`binarize` must be one of"),
        ("device", "tpu", "`device` must be one of"),
        ("hidden_dims", [64, 0], "`hidden_dims` must be positive"),
        ("val_fraction", 1.5, "`val_fraction` must be in \\(0, 1\\)"),
        ("beta", float("nan"), "`beta` must be a finite number"),
        ("download", "yes", "`download` must be bool"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        FitConfig.from_dict({field: value})


def test_unknown_keys_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['epoch'\]"):
        FitConfig.from_dict({"epoch": 3})
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = = 3\n")
    with pytest.raises(ConfigError, match="could not parse config file"):
        FitConfig.load(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        FitConfig.load(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("epochs", 10**23, "cannot finish"),
        ("log_likelihood_samples", 10**9, "cannot finish"),
    ],
)
def test_budgets_no_run_can_finish_are_refused_before_anything_starts(option, value, message):
    from ppl_vae.config import FitConfig as Config

    with pytest.raises(ConfigError, match=message):
        Config(**{option: value})


def test_a_huge_epoch_count_in_a_config_file_is_one_line_exit_2(tmp_path, capsys):
    from ppl_vae.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text("epochs = 100000000000000000000000\n")
    assert main(["fit", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "cannot finish" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
