"""Every `--set` / `dvc exp run -S` example in the README and in `auror --help` is runnable:
it passes validation, or it is a bad-input example whose exact error the README shows."""

import argparse
import re
from pathlib import Path

import pytest

from pipeline.experiment.cli import build_parser
from pipeline.experiment.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_examples() -> list[tuple[str | None, str]]:
    """``(params file or None, KEY=VALUE)`` of every ``--set`` and ``-S`` in the README."""
    found = [(None, m) for m in re.findall(r"--set[ =]([A-Za-z_][\w.]*=[^\s`]+)", README)]
    for m in re.findall(r"dvc exp run -S ([^\s`]+)", README):
        file, _, override = m.rpartition(":") if re.match(r"[\w/.-]+\.yaml:", m) else ("", "", m)
        found.append((file or "params.yaml", override))
    return found


def help_texts() -> str:
    parser = build_parser()
    texts = [parser.format_help()]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            texts += [sub.format_help() for sub in action.choices.values()]
    return " ".join(" ".join(texts).split())  # argparse wraps lines anywhere


def test_the_readme_has_examples_to_check():
    assert len(readme_examples()) >= 6


@pytest.mark.parametrize("params, override", readme_examples(), ids=lambda v: str(v))
def test_readme_override_is_valid_or_shows_its_error(params, override):
    try:
        load_config(ROOT / params if params else None, [override])
    except ConfigError as err:  # a bad-input example: the README prints its message
        assert f"auror: error: {err}" in README, f"--set {override} is refused: {err}"


def test_every_set_example_in_the_help_is_valid():
    examples = re.findall(r"--set ([a-z_][\w.]*=[^\s)]+)", help_texts())  # not the KEY=VALUE metavar
    assert examples
    for override in examples:
        load_config(None, [override])
