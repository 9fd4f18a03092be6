"""The README and the docs site say what the code does.

- every ``auror`` command line in a shell block of the README or of a docs page parses, and its ``--set``
  overrides pass validation (or the page shows the exact error of a bad-input example), as do the help's;
- every command, config key, defense and attack has its generated page, and the results pages' tables are
  the reports' (rendered from each report's JSON, equal to the report's own Markdown);
- the README is short and its headline table is the comparison report's;
- the site builds with ``mkdocs build --strict`` (slow tier).
"""

import argparse
import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.attacks import REGISTRY as ATTACKS
from pipeline.defenses import REGISTRY as DEFENSES
from pipeline.experiment.cli import build_parser
from pipeline.experiment.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = {p.relative_to(ROOT).as_posix(): p.read_text() for p in sorted((ROOT / "docs").glob("**/*.md"))}
TEXTS = {"README.md": README, **PAGES}
_spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
hooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hooks)


@pytest.fixture(scope="module")
def generated():
    return hooks.generated_pages()


# ---------------------------------------------------------------- examples run


def shell_lines(text: str) -> list[str]:
    """The lines of the text's ```bash / ```sh / ```console blocks (continuations joined), and its inline
    code that starts with ``auror``."""
    lines = []
    for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, re.S):
        lines += block.replace("\\\n", " ").splitlines()
    # inline: an example has options (`auror sweep` alone names the command)
    return lines + re.findall(r"(?<!`)`((?:\.venv/bin/)?auror \w+ -[^`]+)`", text)


def auror_commands(text: str) -> list[list[str]]:
    """The arguments of every ``auror`` invocation of the text's shell blocks (after env assignments and a
    ``$`` prompt; up to a comment, a pipe or a ``&``); placeholders such as ``<dataset>`` left out."""
    found = []
    for line in shell_lines(text):
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        tokens = tokens[1:] if tokens[:1] == ["$"] else tokens
        while tokens and re.match(r"^[A-Z_]+=", tokens[0]):
            tokens = tokens[1:]
        if not tokens or not tokens[0].endswith("auror") or any("<" in t or "..." in t for t in tokens):
            continue
        args = []
        for token in tokens[1:]:
            if token in ("|", "&", "&&", ";", ">", "2>&1"):
                break
            args.append(token)
        found.append(args)
    return found


# docs/bad_inputs.md's rows need their context (a file, a folder): tests/test_bad_inputs.py runs each with it
EXAMPLES = [(name, args) for name, text in TEXTS.items() if name != "docs/bad_inputs.md"
            for args in auror_commands(text)]


def test_the_docs_have_commands_to_check():
    assert len(EXAMPLES) >= 30
    assert {name for name, _ in EXAMPLES} >= {"README.md", "docs/getting-started.md", "docs/comparisons.md"}
    assert sum(name == "README.md" for name, _ in EXAMPLES) >= 3


def shown_error(error: ConfigError) -> bool:
    return any(f"auror: error: {error}" in text for text in TEXTS.values())


@pytest.mark.parametrize("page, args", EXAMPLES, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_every_command_in_the_docs_parses_and_its_config_is_valid(page, args):
    if "--help" in args:  # argparse prints and exits: the command before it must exist
        sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        assert args.index("--help") == 0 or args[0] in sub.choices, f"{page}: auror {' '.join(args)}"
        return
    try:
        parsed = build_parser().parse_args(args)
    except ConfigError as err:  # argparse's refusal, one line: only as a shown bad-input example
        assert shown_error(err), f"{page}: auror {' '.join(args)}: {err}"
        return
    params = getattr(parsed, "params", None)
    try:
        load_config(ROOT / params if params else None, getattr(parsed, "overrides", None) or [])
    except ConfigError as err:
        assert shown_error(err), f"{page}: auror {' '.join(args)} is refused: {err}"


def set_examples() -> list[tuple[str | None, str]]:
    """``(params file or None, KEY=VALUE)`` of every ``--set`` and ``dvc exp run -S`` in the README and docs."""
    found = []
    for text in TEXTS.values():
        for line in text.splitlines():  # an override is checked against the params file its command names
            params = re.search(r"--params ([^\s`]+)", line)
            found += [(params and params.group(1), m) for m in re.findall(r"--set[ =]([A-Za-z_][\w.]*=[^\s`]+)", line)]
        for m in re.findall(r"dvc exp run -S ([^\s`]+)", text):
            file, _, override = m.rpartition(":") if re.match(r"[\w/.-]+\.yaml:", m) else ("", "", m)
            found.append((file or "params.yaml", override))
    return sorted(set(found), key=str)


def test_the_docs_have_overrides_to_check():
    assert len(set_examples()) >= 20


@pytest.mark.parametrize("params, override", set_examples(), ids=lambda v: str(v))
def test_every_override_in_the_docs_is_valid_or_shows_its_error(params, override):
    try:
        load_config(ROOT / params if params else None, [override])
    except ConfigError as err:  # a bad-input example: the docs print its message
        assert shown_error(err), f"--set {override} is refused: {err}"


def help_texts() -> str:
    parser = build_parser()
    texts = [parser.format_help()]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            texts += [sub.format_help() for sub in action.choices.values()]
    return " ".join(" ".join(texts).split())  # argparse wraps lines anywhere


def test_every_set_example_in_the_help_is_valid():
    examples = re.findall(r"--set ([a-z_][\w.]*=[^\s)]+)", help_texts())  # not the KEY=VALUE metavar
    assert examples
    for override in examples:
        load_config(None, [override])


# ---------------------------------------------------------------- generated pages


def test_every_command_has_its_page(generated):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        page = generated[f"reference/commands/{name}.md"]
        for action in command._actions:
            for flag in [] if isinstance(action, argparse._HelpAction) else action.option_strings:
                assert f"`{flag}`" in page, f"auror {name} {flag} is not on its page"


def test_every_config_key_has_its_row_with_its_default(generated):
    page = generated["reference/configuration.md"]
    keys = Config().flat()
    assert len(keys) > 60
    for key, default in keys.items():
        row = next((line for line in page.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, f"{key} has no row in the configuration reference"
        assert hooks._code(default) in row, f"{key}: its default {default!r} is not in {row}"
    # and every key params.yaml comments on is one of them (a comment on a key that no longer exists)
    sections = ({k.rsplit(".", 1)[0] for k in keys} | {f"attack.{name}" for name in ATTACKS}
                | {f"defense.{name}" for name in DEFENSES} | {"attack", "defense"})
    assert set(hooks.params_comments()) <= set(keys) | sections


def test_constraints_are_read_from_the_checks(generated):
    """The reference shows the messages the validation gives (here two, one per kind of source)."""
    page = generated["reference/configuration.md"]
    with pytest.raises(ConfigError, match="must be in \\[0, 0.5\\)"):
        load_config(None, ["defense.krum.byzantine_fraction=0.7"])
    assert "| `defense.krum.byzantine_fraction` | float | `0.3` | must be in [0, 0.5) |" in page
    with pytest.raises(ConfigError, match="must be >= 2"):
        load_config(None, ["users.num_users=1"])
    assert "| `users.num_users` | int | `10` | must be >= 2 |" in page


@pytest.mark.parametrize("kind, registry", [("defenses", DEFENSES), ("attacks", ATTACKS)])
def test_every_defense_and_attack_has_its_page(generated, kind, registry):
    index = generated[f"reference/{kind}/index.md"]
    for name, plugin in registry.items():
        page = generated[f"reference/{kind}/{name}.md"]
        assert plugin.summary in page and f"({name}.md)" in index
        section = f"{'defense' if kind == 'defenses' else 'attack'}.{name}"
        for f in dataclasses.fields(plugin.Params):
            assert f"| `{section}.{f.name}` |" in page, f"{section}.{f.name} is not on {name}'s page"
        for key in plugin.search_ranges:  # what `auror tune` searches
            assert key.split(".")[-1] in page


def test_a_plugin_page_names_its_reference_tests(generated):
    page = generated["reference/defenses/krum.md"]
    assert "tests/test_defenses_robust.py::test_krum_and_multi_krum_match_byzfl" in page
    assert "test_bulyan" not in page and "multi_krum_" not in page.split("How it is checked")[1].replace(
        "test_krum_and_multi_krum", "")


def report_md_tables(name: str) -> dict[str | None, str]:
    """The tables of ``reports/<name>.md`` as the command wrote them, by section (``## <attack> (...)``)."""
    md = (hooks.REPORTS / f"{name}.md").read_text()
    tables, section = {}, None
    for line in md.splitlines():
        heading = re.match(r"^## (\S+)", line)
        if heading:
            section = heading[1]
        if line.startswith("|"):
            tables.setdefault(section, []).append(line)
    return {k: "\n".join(v) for k, v in tables.items()}


def table_lines(markdown: str) -> str:
    return "\n".join(line for line in markdown.splitlines() if line.startswith("|"))


@pytest.mark.parametrize("name", hooks.report_names())
def test_the_results_pages_are_the_reports(generated, name):
    """Each table rendered from a report's JSON is the table the command wrote into the report's Markdown."""
    written = report_md_tables(name)
    rendered = hooks.report_tables(name)
    assert set(rendered) == set(written), name
    for section, table in rendered.items():
        assert table_lines(table) == written[section], f"{name} {section}"
        assert table_lines(table) in generated[f"results/{name}.md"]


def test_every_report_has_its_page_and_figure(generated):
    names = hooks.report_names()
    assert {"compare_mnist", "mnist", "gtsrb", "pipeline/mnist", "diagnose_mnist_dirichlet0.5"} <= set(names)
    images = {p.relative_to(ROOT).as_posix() for p in hooks.report_images()}
    for name in names:
        for image in re.findall(r"\]\(((?:\.\./)+reports/[^)]+)\)", generated[f"results/{name}.md"]):
            assert "reports/" + image.split("reports/", 1)[1] in images


def test_the_results_directives_expand_to_the_reports_tables():
    page = "!results compare_mnist label_flip\n\ntext\n"
    assert hooks.expand_results(page, "x.md").startswith(hooks.report_tables("compare_mnist")["label_flip"])
    with pytest.raises(ValueError, match="sections are"):
        hooks.expand_results("!results compare_mnist nothing\n", "x.md")
    used = [m for text in PAGES.values() for m in hooks.DIRECTIVE.findall(text)]
    assert used, "no page shows a report's table"
    every = hooks.expand_results("!results cross-device-mnist\n", "x.md")
    assert every.startswith("\n".join(hooks.report_tables("cross-device-mnist").values()))
    assert all(f"**{attack}**" in every for attack in ("label_flip", "backdoor", "auror_adaptive", "alie", "min_max"))
    for report, section in used:
        tables = hooks.report_tables(report)
        assert (section or None) in tables or (section == "" and None not in tables)


# ---------------------------------------------------------------- the README


def test_the_readme_is_short():
    assert len(README.splitlines()) <= 200


def test_the_readme_headline_table_is_the_comparison_report():
    assert hooks.headline_table() in README


def test_the_headline_table_shows_the_worst_case_of_an_attack_only_once_every_defense_is_searched(tmp_path,
                                                                                                 monkeypatch):
    import json

    pair = {"defense": "auror", "attack": "label_flip", "worst": 0.5, "trials": 10, "done": True}
    unfinished = [{**pair, "attack": "backdoor", "worst": 0.9}, {**pair, "defense": "krum", "attack": "backdoor",
                                                                  "trials": 4, "done": False}]
    (tmp_path / "worst.json").write_text(json.dumps({"n_trials": 10, "pairs": [pair, *unfinished]}))
    monkeypatch.setattr(hooks, "REPORTS", tmp_path)
    assert hooks.searched_pairs("worst") == {"label_flip": {"auror": 0.5}}
    assert hooks.searched_pairs("absent") == {}
    monkeypatch.undo()
    table = hooks.headline_table()
    worst = hooks.searched_pairs()
    head = table.splitlines()[0].split(" | ")
    shown = [attack for attack in worst if any(h.startswith(f"{attack} ") for h in head)]  # the comparison's attacks
    assert "label_flip" in shown
    for attack, values in ((a, worst[a]) for a in shown):  # the committed report's: each value beside its default
        column = next(i for i, h in enumerate(head) if h.startswith(f"{attack} ") and h.endswith(" (worst)"))
        for defense, value in values.items():
            row = next(line for line in table.splitlines() if line.startswith(f"| `{defense}` |"))
            assert row.split(" | ")[column].endswith(f"({value:.3f})")


def test_the_readme_reads_auror_guard_against_its_goal_from_the_reports():
    table = hooks.goal_table()
    assert table in README
    assert len(table.splitlines()) == 2 + 5 and all("met" in line for line in table.splitlines()[2:])


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    """In a scratch folder: it writes reports/ and mlruns/ where it runs."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), scope)
    assert scope["metrics"]["auror"]["detection_rate"] is not None


def test_the_readme_points_to_pages_that_exist():
    for link in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (ROOT / link).is_file(), link


# ---------------------------------------------------------------- the site


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
    """``make docs``: a broken link, a missing page or a bad anchor is an error."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "reference" / "defenses" / "krum" / "index.html").is_file()
    assert (tmp_path / "reports" / "compare_mnist.png").is_file()
    html = (tmp_path / "results" / "compare_mnist" / "index.html").read_text()
    assert "<table>" in html
