"""The site's generated pages: MkDocs runs this hook (``hooks:`` in ``mkdocs.yml``).

Nothing here is copied by hand. The pages come from what they describe:

- ``reference/commands/<command>.md``: the CLI's parser (``auror <command> --help``);
- ``reference/configuration.md``: the config dataclasses (key, type, default), ``params.yaml`` (the comment
  beside each key) and the checks of ``validate`` (each key's constraint, read from the source);
- ``reference/defenses/<name>.md``, ``reference/attacks/<name>.md``: the registries (summary, docstrings,
  parameters with defaults, constraints and comments, what ``auror tune`` searches, the tests that check it);
- ``results/<report>.md``: every ``reports/*.json``, its tables rendered from the JSON and its figure;
- a line ``!results <report> [<section>]`` in a hand-written page: that report's table, from its JSON (no
  section, in a comparison or a sweep: each attack's table).

``tests/test_docs.py`` checks that every command, config key, defense and attack has its page and that the
tables equal the reports'.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import re
import textwrap
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "reports"
DIRECTIVE = re.compile(r"^!results (\S+)(?: (\S+))?[ \t]*$", re.M)


# ---------------------------------------------------------------- the code's own descriptions


def params_comments() -> dict[str, str]:
    """``{dotted key: the comment beside it in params.yaml}``, continuation comments (``#   ...``) joined."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in (ROOT / "params.yaml").read_text().splitlines():
        m = re.match(r"^( *)([A-Za-z_]\w*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m[1]), m[2], m[3]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        value, _, comment = rest.partition("#")
        if comment.strip():
            comments[dotted] = comment.strip()
        if not value.strip():  # a section: its keys follow, indented
            stack.append((indent, key))
    return comments


def _render(node: ast.expr, names: dict) -> str | None:
    """A string argument as text: a constant, or an f-string with what can be evaluated from ``names`` filled
    in (the rest shown as ``{expression}``, e.g. a bound that depends on the dataset)."""
    if isinstance(node, ast.Constant):
        return str(node.value)
    if not isinstance(node, ast.JoinedStr):
        return None
    out = []
    for part in node.values:
        if isinstance(part, ast.Constant):
            out.append(str(part.value))
            continue
        try:
            out.append(str(eval(compile(ast.Expression(part.value), "<docs>", "eval"), dict(names))))
        except Exception:
            out.append(f"{{{ast.unparse(part.value)}}}")
    return "".join(out)


def constraints(function) -> dict[str, list[str]]:
    """``{key: [messages]}`` of the checks ``check(ok, key, message, value)`` (or ``_check``) in ``function``'s
    source, loops over literal tuples unrolled. A plug-in's ``validate(self, key)`` names its fields
    ``f"{key}.<field>"``: those keys are returned as ``<field>``."""
    module = vars(inspect.getmodule(function))
    found: dict[str, list[str]] = {}

    def visit(node: ast.AST, bound: dict) -> None:
        if (isinstance(node, ast.For) and isinstance(node.target, ast.Name) and isinstance(node.iter, ast.Tuple)
                and all(isinstance(e, ast.Constant) for e in node.iter.elts)):
            for element in node.iter.elts:
                for child in node.body:
                    visit(child, {**bound, node.target.id: element.value})
            return
        if (isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("check", "_check")
                and len(node.args) >= 3):
            key = _render(node.args[1], {**module, "key": "", **bound})
            message = _render(node.args[2], {**module, **bound})
            if key is not None and "{" not in key and message is not None:
                messages = found.setdefault(key.lstrip("."), [])
                if message not in messages:
                    messages.append(message)
        for child in ast.iter_child_nodes(node):
            visit(child, bound)

    visit(ast.parse(textwrap.dedent(inspect.getsource(function))), {})
    return found


class RecordingTrial:
    """An Optuna trial stand-in that records what a ``search_space`` asks for; a choice is answered from
    ``answers`` (default: its first option), and the choices asked are kept to be answered otherwise."""

    def __init__(self, answers: dict[str, object] | None = None) -> None:
        self.answers = answers or {}
        self.asked: list[tuple[str, str]] = []
        self.choices: list[tuple[str, list]] = []

    def suggest_float(self, name, low, high, log=False, **_):
        self.asked.append((name, f"float in [{low:g}, {high:g}]" + (", log scale" if log else "")))
        return low

    def suggest_int(self, name, low, high, log=False, **_):
        self.asked.append((name, f"integer in [{low}, {high}]" + (", log scale" if log else "")))
        return low

    def suggest_categorical(self, name, choices):
        self.asked.append((name, "one of " + ", ".join(map(str, choices))))
        self.choices.append((name, list(choices)))
        return self.answers.get(name, choices[0])


def search_space(plugin) -> list[tuple[str, str]]:
    """What ``plugin.search_space`` asks of the default config, each key with the options of a choice under
    which alone it is asked (Fang's ``b``: when ``target`` = trimmed_mean); one level of choices."""
    from pipeline.experiment.config import load_config

    cfg = load_config(None)
    first = RecordingTrial()
    plugin.search_space(first, cfg)
    asked = dict(first.asked)
    conditions: dict[str, str] = {}
    for name, options in first.choices:
        under = {}
        for option in options:
            trial = RecordingTrial({name: option})
            plugin.search_space(trial, cfg)
            under[option] = dict(trial.asked)
            asked = {**asked, **under[option]}
        for key in asked:
            where = [str(o) for o in options if key in under[o]]
            if len(where) < len(options):
                conditions[key] = f" (when `{name}` = {' or '.join(where)})"
    return [(k, r + conditions.get(k, "")) for k, r in asked.items()]


@cache
def test_functions() -> list[tuple[str, str, str]]:
    """``(file, test name, first docstring line)`` of every test function under ``tests/``."""
    out = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                doc = (ast.get_docstring(node) or "").strip().split("\n")[0]
                out.append((f"tests/{path.name}", node.name, doc))
    return out


def tests_of(name: str, others: list[str]) -> list[tuple[str, str, str]]:
    """The tests of ``tests/test_<name>.py`` and those whose name holds ``name`` as words (``krum`` in
    ``test_krum_matches_byzfl``), not as part of another plug-in's name (``multi_krum``)."""
    longer = sorted((o for o in others if o != name and name in o), key=len, reverse=True)
    hits = []
    for file, test, doc in test_functions():
        words = test[len("test_"):]
        for other in longer:
            words = re.sub(rf"(^|_){other}(_|$)", "_", words)
        if file == f"tests/test_{name}.py" or re.search(rf"(^|_){name}(_|$)", words):
            hits.append((file, test, doc))
    return hits


# ---------------------------------------------------------------- pages


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _code(value) -> str:
    """A default as YAML writes it (``.inf`` for infinity)."""
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return f"`{'-' if value < 0 else ''}.inf`"
    return f"`{json.dumps(value) if not isinstance(value, str) else value}`"


def command_pages() -> dict[str, str]:
    from pipeline.experiment.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    pages = {}
    for name, command in sub.choices.items():
        lines = [f"# auror {name}", "", helps[name][0].upper() + helps[name][1:] + ".", "",
                 "```", command.format_usage().strip(), "```", "", "| option | default | meaning |", "|---|---|---|"]
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flags = ", ".join(f"`{f}`" for f in action.option_strings) or f"`{action.dest}`"
            if action.metavar:
                flags += f" {_cell(action.metavar)}"
            default = "" if action.default in (None, False, argparse.SUPPRESS) else _code(action.default)
            meaning = (action.help or "").replace("%%", "%")
            lines.append(f"| {flags} | {default} | {_cell(meaning)} |")
        lines += ["", f"Every `--set` key: [the configuration reference](../configuration.md). Exit codes: 0 done, "
                  "1 some cells failed (the others are recorded), 2 a refused input (one line, before any work), 3 a lost "
                  "server (`run --resume ID` or the same command continues), 130 interrupted (a run prints its "
                  "`--resume` id).", ""]
        pages[f"reference/commands/{name}.md"] = "\n".join(lines)
    return pages


def _type_name(hint) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def _field_rows(params_cls, section: str, checks: dict[str, list[str]], comments: dict[str, str]) -> list[str]:
    from typing import get_type_hints

    hints = get_type_hints(params_cls)
    defaults = dataclasses.asdict(params_cls())
    rows = []
    for f in dataclasses.fields(params_cls):
        key = f"{section}.{f.name}"
        rows.append(f"| `{key}` | {_type_name(hints[f.name])} | {_code(defaults[f.name])} | "
                    f"{_cell('; '.join(checks.get(f.name, checks.get(key, []))) or '-')} | "
                    f"{_cell(comments.get(key, ''))} |")
    return rows


HEAD = ["| key | type | default | constraint | comment (params.yaml) |", "|---|---|---|---|---|"]


def configuration_page() -> str:
    from pipeline.attacks import REGISTRY as ATTACKS
    from pipeline.defenses import REGISTRY as DEFENSES
    from pipeline.experiment import config as c

    comments, checks = params_comments(), constraints(c.validate)
    for section in (c.ServerConfig, c.ProtocolConfig, c.FaultsConfig):  # the sections that check themselves
        checks.update(constraints(section.validate))
    lines = ["# Configuration reference", "",
             "Every key of `params.yaml`, from the config's dataclasses (type, default), the comment beside the key "
             "in `params.yaml`, and the checks that `validate` runs before any work (a key given a value "
             "outside its constraint is refused in one line naming it, exit 2). Set any key with "
             "`--set section.key=value` or in a params file (`--params`). Guide: [Configuration](../configuration.md).",
             ""]
    top = c.Config()
    sections = [("seed", None)] + [(f.name, getattr(top, f.name)) for f in dataclasses.fields(c.Config)
                                   if f.name != "seed"]
    for section, value in sections:
        if value is None:
            lines += ["## seed", "", *HEAD,
                      f"| `seed` | int | `{top.seed}` | {_cell('; '.join(checks['seed']))} | "
                      f"{_cell(comments.get('seed', ''))} |", ""]
            continue
        plugins = {"attack": ATTACKS, "defense": DEFENSES}.get(section, {})
        shared = [f for f in dataclasses.fields(value) if f.name not in plugins]
        lines += [f"## {section}", ""]
        if comments.get(section):
            lines += [comments[section], ""]
        if shared:
            lines += HEAD
            cls = type(value) if section not in plugins or section != "attack" else c.AttackSettings
            lines += [row for row in _field_rows(cls, section, checks, comments)
                      if row.split("`")[1].split(".")[1] in {f.name for f in shared}]
            lines.append("")
        for name, plugin in plugins.items():
            kind = "defenses" if section == "defense" else "attacks"
            comment = comments.get(f"{section}.{name}")
            lines += [f"### {section}.{name}", "", f"{plugin.summary}. Page: [{name}]({kind}/{name}.md)."
                      + (f" In `params.yaml`: {comment}." if comment else ""), ""]
            if dataclasses.fields(plugin.Params):
                lines += HEAD + _field_rows(plugin.Params, f"{section}.{name}",
                                            constraints(plugin.Params.validate), comments) + [""]
            else:
                lines += ["No parameters of its own.", ""]
    return "\n".join(lines)


def _docstring(obj) -> str:
    return inspect.cleandoc(obj.__doc__ or "")


def _rst_to_md(text: str) -> str:
    """The docstrings' reST roles and literals as Markdown code."""
    text = re.sub(r":(?:mod|class|func|meth|data|attr):`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def plugin_page(kind: str, name: str, plugin, names: list[str]) -> str:
    from pipeline.experiment import config as c

    module = inspect.getmodule(plugin)
    section = f"{'defense' if kind == 'defenses' else 'attack'}.{name}"
    lines = [f"# {name}", "", f"**{plugin.summary}.**", "",
             f"`{'--arms ' + name if kind == 'defenses' else '--set attack.name=' + name}` · config section "
             f"[`{section}`](../configuration.md#{section.replace('.', '')}) · source `{module.__name__}`", "",
             "## Rule", "", _rst_to_md(_docstring(module)), ""]
    if _docstring(plugin):
        lines += [_rst_to_md(_docstring(plugin)), ""]
    lines += ["## Parameters", ""]
    if dataclasses.fields(plugin.Params):
        lines += HEAD + _field_rows(plugin.Params, section, constraints(plugin.Params.validate),
                                    params_comments()) + [""]
    else:
        lines += ["No parameters of its own" + (" (it reads the shared keys of `attack`: see the "
                                                "[configuration reference](../configuration.md#attack))"
                                                if kind == "attacks" else "") + ".", ""]
    if kind == "defenses":
        flags = {"none": "nobody (a robust aggregator): DR and FPR are `-`",
                 "round": "users round by round: DR / FPR averaged over rounds",
                 "run": "users once and for all: DR / FPR of its final flags"}[plugin.flags]
        lines += ["## Properties", "", f"- Leaves out: {flags}.",
                  f"- Partial uploads (DSSGD, `protocol.theta_u < 1`): "
                  f"{'aggregated per coordinate' if plugin.handles_missing else 'refused before any run'}.",
                  f"- Server-held clean data: {'yes (`root_size` samples)' if plugin.needs_root_data else 'no'}.", ""]
    else:
        metric = {"source_to_target": "SR: source-class test inputs classified as the target",
                  "backdoor": "backdoor rate: triggered test inputs of the other classes classified as the target",
                  "accuracy_drop": "untargeted: the accuracy drop against the benign arm"}
        depends = isinstance(inspect.getattr_static(plugin, "success_metric"), property)
        default = plugin(plugin.Params(), c.AttackSettings()).success_metric
        lines += ["## Properties", "", f"- Success: {metric[default]}"
                  + (" (with the default parameters; it depends on them: see the rule above)." if depends else "."),
                  f"- Omniscient (sees the honest updates of the round): {'yes' if plugin.omniscient else 'no'}.",
                  f"- Trains with `attack.malicious_epochs` / `malicious_lr_multiplier`: "
                  f"{'yes' if plugin.trains_maliciously else 'no'}.",
                  f"- Update multiplied by `attack.boost`: {'yes' if plugin.boosted else 'no'}.", ""]
    space = search_space(plugin)
    lines += ["## What `auror tune` searches", ""]
    if space:
        lines += ["| key | range |", "|---|---|"] + [f"| `{k}` | {_cell(r)} |" for k, r in space] + [""]
        if any("one of" in r for _, r in space):
            lines += ["(Asked of the default config, under each option of its choice.)", ""]
    else:
        lines += ["Nothing: it has no float parameter to search.", ""]
    checked = tests_of(name, names)
    lines += ["## How it is checked", ""]
    lines += ([f"- `{file}::{test}`" + (f": {doc}" if doc else "") for file, test, doc in checked]
              or ["Its tests are the ones run over every registered plug-in (in `tests/test_"
                  f"{'defenses_end_to_end' if kind == 'defenses' else 'attacks'}.py`)."])
    lines.append("")
    return "\n".join(lines)


def plugin_pages() -> dict[str, str]:
    from pipeline.attacks import REGISTRY as ATTACKS
    from pipeline.defenses import REGISTRY as DEFENSES

    pages = {}
    for kind, registry in (("defenses", DEFENSES), ("attacks", ATTACKS)):
        names = list(registry)
        index = [f"# {kind.capitalize()}", "", f"Every registered {kind[:-1]} (`auror {kind}` lists the same). "
                 f"Guide: [{kind.capitalize()}](../../{kind}.md).", "", "| name | summary |", "|---|---|"]
        for name, plugin in registry.items():
            pages[f"reference/{kind}/{name}.md"] = plugin_page(kind, name, plugin, names)
            index.append(f"| [`{name}`]({name}.md) | {_cell(plugin.summary)} |")
        pages[f"reference/{kind}/index.md"] = "\n".join(index) + "\n"
    return pages


# ---------------------------------------------------------------- results, from reports/*.json


def report_kind(data: dict) -> str:
    if "leaderboard" in data:
        return "worst_case"
    if "setting" in data and "seeds" in data:
        return "diagnose"
    if "missing" in data:
        return "compare"
    return "paper"


def _fmt(value, decimals: int = 3) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def _config(data: dict):
    """The Config a report was computed with (its JSON's ``config.values``)."""
    from pipeline.experiment.config import load_config, with_overrides

    return with_overrides(load_config(None), [f"{k}={v if isinstance(v, str) else json.dumps(v)}"
                                             for k, v in data["config"]["values"].items()])


def compare_tables(data: dict) -> dict[str, str]:
    """``{attack: its Markdown table}``, as ``auror compare`` writes them (its own functions)."""
    from pipeline.experiment.compare import attack_kind, attack_table

    cfg = _config(data)
    seeds = max(m["seeds"] for t in data["results"].values() for row in t.values() for m in row.values())
    out = {}
    for attack, table in data["results"].items():
        settings = list(dict.fromkeys(label for row in table.values() for label in row))
        caption = f"**{attack}** ({attack_kind(attack, cfg)}); each cell: accuracy / SR / AD / DR / FPR"
        out[attack] = "\n".join([caption, "", *attack_table(table, settings, seeds, 3)]) + "\n"
    return out


def paper_table(name: str, data: dict) -> str:
    """The paper report's table (ours beside the paper's numbers), as ``auror report`` writes it."""
    from pipeline.experiment.config import load_config
    from pipeline.experiment.report import markdown_table, paper_settings

    results = data.get("results", data)  # reports written before the config was recorded hold the results alone
    dataset = data["config"]["values"]["data.name"] if "config" in data else Path(name).name
    params = ROOT / "configs" / f"{dataset}.yaml"
    settings = {s.label: s for s in paper_settings(load_config(params if params.exists() else None))}
    return markdown_table([(settings[label], r) for label, r in results.items()]) + "\n"


def diagnose_table(name: str, data: dict) -> str:
    """The diagnosis table and per-seed flags, as ``auror diagnose`` writes them (its title left out)."""
    from pipeline.experiment.config import load_config
    from pipeline.experiment.diagnose import diagnosis_markdown

    if "config" in data:
        cfg = _config(data)
    else:  # written before the config was recorded: the dataset's config with the report's setting
        cfg = load_config(ROOT / "configs" / f"{name.split('_')[1]}.yaml", data["setting"])
    from pipeline.core.metrics import accuracy_drop

    for seed in data["seeds"].values():  # reports written before the JSON held each arm's accuracy drop
        benign = seed["arms"]["benign"]["accuracy"]
        for row in seed["arms"].values():
            row.setdefault("accuracy_drop", accuracy_drop(benign, row["accuracy"]))
    defenses = [a for a in next(iter(data["seeds"].values()))["arms"] if a not in ("benign", "attack")]
    text = diagnosis_markdown(data, defenses, cfg, " ".join(data["setting"]))
    return text.split("\n", 2)[2]


def headline_table(name: str = "compare_mnist", setting: str = "IID 30%", worst_case: str = "worst_case_mnist") -> str:
    """The README's table: each defense's success of each attack at one setting of a comparison report
    (SR for the targeted attacks and backdoors, AD for the untargeted ones), and its false-positive rate
    under the paper's label flipping. An attack whose every pair ``auror worst-case`` has searched to its
    budget (``reports/<worst_case>.json``) shows each defense's worst value in parentheses."""
    from pipeline.attacks import REGISTRY as ATTACKS

    data = json.loads((REPORTS / f"{name}.json").read_text())
    cfg = _config(data)
    results = data["results"]
    metric = {attack: ATTACKS[attack](getattr(cfg.attack, attack), cfg.attack).success_metric for attack in results}
    worst = searched_pairs(worst_case)
    head = [f"{attack} {'AD' if metric[attack] == 'accuracy_drop' else 'SR'}" + (" (worst)" if attack in worst else "")
            for attack in results]
    lines = ["| defense | " + " | ".join(head) + " | label_flip FPR |", "|---|" + "---|" * (len(head) + 1)]
    for arm in results["label_flip"]:
        if arm == "benign":
            continue
        cells = []
        for attack, table in results.items():
            m = table.get(arm, {}).get(setting)
            key = "accuracy_drop" if metric[attack] == "accuracy_drop" else "attack_success_rate"
            found = worst.get(attack, {}).get(arm)
            cells.append(("" if m is None else _fmt(m[key])) + ("" if found is None else f" ({_fmt(found)})"))
        fpr = results["label_flip"][arm][setting]["false_positive_rate"]
        label = "none (no defense)" if arm == "attack" else f"`{arm}`"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_fmt(fpr)} |")
    return "\n".join(lines) + "\n"


def searched_pairs(name: str = "worst_case_mnist") -> dict[str, dict[str, float]]:
    """``{attack: {defense: worst value}}`` of ``reports/<name>.json`` for the attacks whose every pair is
    searched to the report's budget (``done``; an attack still under way is left out)."""
    path = REPORTS / f"{name}.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    by_attack: dict[str, list[dict]] = {}
    for pair in data["pairs"]:
        by_attack.setdefault(pair["attack"], []).append(pair)
    return {attack: {p["defense"]: p["worst"] for p in pairs} for attack, pairs in by_attack.items()
            if all(p["done"] for p in pairs)}


GOAL_ARMS = ("auror", "auror_guard", "multi_krum")


def goal_table(arms: tuple[str, ...] = GOAL_ARMS) -> str:
    """The README's reading of issue 29's goal: per goal row, each arm's worst cell of the MNIST matrix
    (``compare_mnist.json``: every attack, every setting) and of the runs with nobody malicious
    (``nobody-mnist.json``), and whether it meets the bound."""
    from pipeline.attacks import REGISTRY as ATTACKS

    compare = json.loads((REPORTS / "compare_mnist.json").read_text())
    nobody = json.loads((REPORTS / "nobody-mnist.json").read_text())
    cfg = _config(compare)
    results = compare["results"]
    kind = {a: ATTACKS[a](getattr(cfg.attack, a), cfg.attack).success_metric for a in results}

    def worst(arm: str, value, tables: dict) -> float | None:
        found = [value(attack, label, m, tables[attack]["benign"].get(label))
                 for attack in tables for label, m in tables[attack].get(arm, {}).items()]
        found = [v for v in found if v is not None]
        return max(found) if found else None

    rows = [
        ("targeted SR - benign SR (label flipping, `auror_adaptive`, backdoors)", 0.05, results,
         lambda a, label, m, b: None if kind[a] == "accuracy_drop" else m["attack_success_rate"] - b["attack_success_rate"]),
        ("untargeted AD (ALIE, IPM, Min-Max)", 0.02, results,
         lambda a, label, m, b: m["accuracy_drop"] if kind[a] == "accuracy_drop" else None),
        ("FPR, every attack", 0.1, results, lambda a, label, m, b: m["false_positive_rate"]),
        ("nobody malicious: FPR", 0.05, nobody["results"], lambda a, label, m, b: m["false_positive_rate"]),
        ("nobody malicious: AD", 0.01, nobody["results"], lambda a, label, m, b: m["accuracy_drop"]),
    ]
    lines = ["| goal (worst cell, IID and Dirichlet(0.5), seeds 0-2) | bound | " + " | ".join(f"`{a}`" for a in arms)
             + " |", "|---|---|" + "---|" * len(arms)]
    for label, bound, tables, value in rows:
        cells = []
        for arm in arms:
            v = worst(arm, value, tables)
            cells.append("-" if v is None else f"{v:.3f} {'met' if v <= bound else 'not met'}")
        lines.append(f"| {label} | {bound} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@cache
def report_tables(name: str) -> dict[str | None, str]:
    """``{section: table}`` of ``reports/<name>.json`` (``None``: the report's one table)."""
    path = REPORTS / f"{name}.json"
    if not path.exists():
        raise ValueError(f"!results {name}: no {path.relative_to(ROOT)}")
    data = json.loads(path.read_text())
    kind = report_kind(data)
    if kind == "compare":
        return compare_tables(data)
    if kind == "paper":
        return {None: paper_table(name, data)}
    if kind == "worst_case":
        from pipeline.experiment.worst_case import report_tables as worst_case_tables

        return worst_case_tables(data)
    return {None: diagnose_table(name, data)}


def expand_results(markdown: str, page: str) -> str:
    """Every ``!results <report> [<section>]`` line of a page replaced by that table (no section, in a
    report of one table per attack: every one of them)."""

    def table(m: re.Match) -> str:
        tables = report_tables(m[1])
        if m[2] is None and None not in tables:
            return "\n".join(tables.values())
        if m[2] not in tables:
            raise ValueError(f"{page}: !results {m[1]} {m[2] or ''}: sections are {', '.join(map(str, tables))}")
        return tables[m[2]]

    return DIRECTIVE.sub(table, markdown)


def report_names() -> list[str]:
    return sorted(str(p.relative_to(REPORTS).with_suffix("")) for p in REPORTS.glob("**/*.json")
                  if _is_report(p))


def _is_report(path: Path) -> bool:
    """A report's JSON (not a results store's cell file, nor a stage's ``data.json`` / ``latest.json``)."""
    if path.name in ("data.json", "latest.json") or path.parent.name in ("benign",) or "compare" in path.parts[-3:-1]:
        return False
    return path.with_suffix(".md").exists()


def results_pages() -> dict[str, str]:
    pages = {}
    index = ["# Every report", "",
             "Each page below is a report under `reports/`: its tables are rendered from the report's JSON when the "
             "site is built, beside its figure. The command that produced it is named in the report's Markdown "
             "(`reports/<name>.md`); the guides ([the paper's setting](../paper.md), [comparisons](../comparisons.md), "
             "[non-IID](../noniid.md)) read them.", "", "| report | kind |", "|---|---|"]
    for name in report_names():
        data = json.loads((REPORTS / f"{name}.json").read_text())
        kind = report_kind(data)
        depth = "../" * name.count("/")
        md = (REPORTS / f"{name}.md").read_text()
        produced = next((line for line in md.splitlines() if line.startswith("Produced by")), "")
        lines = [f"# {name}", "", produced, ""]
        for section, table in report_tables(name).items():
            if section:
                lines += [f"## {section}", ""]
            lines += [table, ""]
        for image in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md):
            lines += [f"![{name}]({depth}../reports/{Path(name).parent / image})".replace("/./", "/"), ""]
        lines += [f"Every value: `reports/{name}.json`.", ""]
        pages[f"results/{name}.md"] = "\n".join(lines)
        index.append(f"| [{name}]({name}.md) | {kind} |")
    pages["results/index.md"] = "\n".join(index) + "\n"
    return pages


def generated_pages() -> dict[str, str]:
    """Every generated page: ``{path under docs/: Markdown}``."""
    return {**command_pages(), "reference/configuration.md": configuration_page(), **plugin_pages(),
            **results_pages()}


def report_images() -> list[Path]:
    return sorted(p for p in REPORTS.glob("**/*.png") if "plots" not in p.parts and "cell-runs" not in p.parts)


# ---------------------------------------------------------------- MkDocs events


def _nav(paths: list[str], prefix: str) -> list:
    items = [p for p in paths if p.startswith(prefix)]
    index = [p for p in items if p.endswith("index.md")]
    return index + [{p[len(prefix):-len(".md")]: p} for p in items if not p.endswith("index.md")]


def on_config(config):
    pages = list(generated_pages())
    nav = config["nav"]
    reference = next(item["Reference"] for item in nav if "Reference" in item)
    reference[:0] = [{"Commands": [{f"auror {Path(p).stem}": p} for p in pages if p.startswith("reference/commands/")]},
                     {"Configuration": "reference/configuration.md"},
                     {"Defenses": _nav(pages, "reference/defenses/")},
                     {"Attacks": _nav(pages, "reference/attacks/")}]
    results = next(item["Results"] for item in nav if "Results" in item)
    results.append({"Every report": _nav(pages, "results/")})
    return config


def on_files(files, config):
    from mkdocs.structure.files import File

    for path, content in generated_pages().items():
        files.append(File.generated(config, path, content=content))
    for image in report_images():
        files.append(File.generated(config, str(image.relative_to(ROOT)), abs_src_path=str(image)))
    return files


def on_page_markdown(markdown, page, config, files):
    return expand_results(markdown, page.file.src_uri)
