"""The command line's options come from the configs: every shared field is declared once (the
same flag, type and choices in ``fit``, ``ssl`` and ``compare``), and every field a user sets has
a flag that reaches it."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from ppl_vae.cli import build_parser
from ppl_vae.cli.fit import config_from_args as fit_config
from ppl_vae.cli.ssl import config_from_args as ssl_config
from ppl_vae.config import FitConfig, RunConfig, SSLConfig

#: Fields set only in a config file (with the reason).
CONFIG_ONLY = {
    "log_likelihood_chunk": "fit: particles per importance-sampling chunk, a memory knob",
    "estimator": "ssl: the label guide's own unless a config sets it (compare --kind m2 rows)",
}


def _actions(command: str) -> dict[str, argparse.Action]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices[command]._actions}


def _flag_dest(field_name: str) -> str:
    return field_name.removesuffix("_args") + "_arg" if field_name.endswith("_args") else field_name


@pytest.mark.parametrize("command", ["fit", "ssl", "compare"])
def test_shared_fields_have_one_declaration(command):
    reference = _actions("fit")
    actions = _actions(command)
    for f in fields(RunConfig):
        dest = _flag_dest(f.name)
        assert dest in actions, (command, f.name)
        a, r = actions[dest], reference[dest]
        assert (a.option_strings, a.type, a.choices, type(a)) == (
            r.option_strings,
            r.type,
            r.choices,
            type(r),
        ), (command, f.name)


@pytest.mark.parametrize("cfg_cls, command", [(FitConfig, "fit"), (SSLConfig, "ssl")])
def test_every_field_has_a_flag(cfg_cls, command):
    actions = _actions(command)
    missing = [
        f.name
        for f in fields(cfg_cls)
        if _flag_dest(f.name) not in actions and f.name not in CONFIG_ONLY
    ]
    assert not missing, missing


@pytest.mark.parametrize(
    "command, collect, argv, expected",
    [
        ("fit", fit_config, ["--val-fraction", "0.25", "--guide-family-arg", "num_flows=3"],
         {"val_fraction": 0.25, "guide_family_args": {"num_flows": 3}}),
        ("ssl", ssl_config, ["--no-latent-diagnostics", "--patience", "4", "--prior-arg", "a=1"],
         {"latent_diagnostics": False, "patience": 4, "prior_args": {"a": 1}}),
    ],
)  # fmt: skip
def test_flags_reach_their_fields(command, collect, argv, expected):
    args = build_parser().parse_args([command, *argv])
    assert collect(args) == expected
