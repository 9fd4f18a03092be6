import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def dvc_executable() -> str | None:
    beside = Path(sys.executable).parent / "dvc"  # the venv's, when it is not on PATH
    return str(beside) if beside.is_file() else shutil.which("dvc")


def matrix_items(stage: dict) -> list[dict]:
    """The items a stage expands to: a ``matrix``'s combinations, or a ``foreach``'s entries (its key as
    ``key``)."""
    if "foreach" in stage:
        return [{"key": key, **values} for key, values in stage["foreach"].items()]
    matrix = stage.get("matrix", {})
    return [dict(zip(matrix, values)) for values in itertools.product(*matrix.values())]


def body(stage: dict) -> dict:
    """What a stage runs: a ``foreach`` stage's ``do``, or the stage itself."""
    return stage.get("do", stage)


def fill(text: str, item: dict) -> str:
    text = re.sub(r"\$\{key\}", lambda m: str(item["key"]), text)
    return re.sub(r"\$\{item\.(\w+)\}", lambda m: str(item[m.group(1)]), text)


def has_key(values: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(values, dict) or part not in values:
            return False
        values = values[part]
    return True


def stage_params(stage: dict, item: dict) -> list[tuple[str, str]]:
    """(file, key) for every params entry of one expanded stage."""
    out = []
    for entry in stage.get("params", []):
        if isinstance(entry, str):
            out.append(("params.yaml", entry))
        else:
            out += [(fill(file, item), fill(key, item)) for file, keys in entry.items() for key in keys]
    return out


EXPANDED = [(name, body(stage), item) for name, stage in PIPELINE["stages"].items() for item in matrix_items(stage)]


@pytest.mark.parametrize("name, stage, item", EXPANDED,
                         ids=[f"{n}@{'-'.join(map(str, i.values()))}" for n, _, i in EXPANDED])
def test_every_params_key_and_code_dep_exists(name, stage, item):
    for file, key in stage_params(stage, item):
        assert has_key(yaml.safe_load((ROOT / file).read_text()), key), f"{name}: {file} has no {key}"
    # ${section.key} in the command is read from params.yaml, and must be a listed param
    listed = {key for file, key in stage_params(stage, item) if file == "params.yaml"}
    for key in re.findall(r"\$\{(?!item\.|key\})([\w.]+)\}", stage["cmd"]):  # ${key}: a foreach entry
        assert key in listed, f"{name}: the command reads {key} but params does not list it"
    outputs = {fill(next(iter(o)) if isinstance(o, dict) else o, i)
               for s in PIPELINE["stages"].values() for i in matrix_items(s)
               for kind in ("outs", "metrics", "plots") for o in body(s).get(kind, [])}
    for dep in stage.get("deps", []):
        path = fill(dep, item)
        # a folder of other stages' outputs (the comparison's cells) is a dependency too
        made = path in outputs or any(Path(o).is_relative_to(path) for o in outputs)
        assert made or (ROOT / path).exists(), f"{name}: missing dependency {path}"


@pytest.mark.slow
@pytest.mark.skipif(dvc_executable() is None, reason="the dvc executable is not installed (pip install -e '.[dev]')")
@pytest.mark.skipif(not (ROOT / ".dvc").is_dir(), reason="not a DVC repository (no .dvc/ at the repository root)")
def test_dvc_parses_the_pipeline():
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run([dvc_executable(), "dag", "--mermaid"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    for stage in ("prepare@digits", "benign@mnist", "attack@gtsrb-0.3", "auror@digits-0.1", "report@gtsrb"):
        assert stage in out.stdout


def test_only_the_report_stages_read_the_report_params():
    readers = {name for name, stage, item in EXPANDED
               if any(key.startswith("report.") for _, key in stage_params(stage, item))}
    assert readers == {"report", "compare"}


def project_modules_imported_by(module: str) -> set[str]:
    """Files of the project's packages that importing ``module`` loads (in a fresh interpreter)."""
    code = (f"import sys, {module}\n"
            "from pipeline.lazy import OnFirstUse\n"
            "for _ in range(3):  # and what they import on first use (pipeline.lazy), and what that imports\n"
            "    for m in list(sys.modules.values()):\n"
            "        if (getattr(m, '__name__', '') or '').startswith(('pipeline', 'datamodules', 'lightning_modules')):\n"
            "            for v in list(vars(m).values()):\n"
            "                if isinstance(v, OnFirstUse):\n"
            "                    getattr(v, '__name__', None)\n"
            "for m in list(sys.modules.values()):\n"
            "    f = getattr(m, '__file__', None) or ''\n"
            "    print(f)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    files = {Path(line).resolve() for line in out.stdout.splitlines() if line.endswith(".py")}
    return {str(f.relative_to(ROOT)) for f in files
            if f.is_relative_to(ROOT) and f.parts[len(ROOT.parts)] in ("pipeline", "datamodules", "lightning_modules")
            and f.name != "__init__.py"}


# what an arm stage may leave out although the experiment imports it: the modules of the defenses
# it does not run (the registry imports them all) and the other datasets' datamodules
DEFENSE_MODULES = {str(f.relative_to(ROOT)) for f in (ROOT / "pipeline" / "defenses").glob("*.py")
                   if f.name not in ("__init__.py", "base.py", "none.py")}
OWN_DEFENSE = {"auror": {"pipeline/defenses/auror.py", "pipeline/defenses/clustering.py"}}
# likewise the attacks other than label flipping (the arm stages run the paper's attack)
ATTACK_MODULES = {str(f.relative_to(ROOT)) for f in (ROOT / "pipeline" / "attacks").glob("*.py")
                  if f.name not in ("__init__.py", "base.py", "label_flip.py")}
DATAMODULES = {f"datamodules/{name}.py" for name in ("digits", "mnist", "fashion_mnist", "gtsrb", "cifar10")}


@pytest.mark.slow
@pytest.mark.parametrize("arm", ["benign", "attack", "auror"])
def test_arm_stages_depend_on_every_module_the_run_imports(arm):
    imported = project_modules_imported_by("pipeline.experiment.run")
    for item in matrix_items(PIPELINE["stages"][arm]):
        deps = {fill(d, item) for d in PIPELINE["stages"][arm]["deps"]}
        covered = {f for f in imported if f in deps or f.split("/")[0] in deps}
        missing = imported - covered - (DATAMODULES - {f"datamodules/{item['dataset']}.py"})
        missing -= (DEFENSE_MODULES - OWN_DEFENSE.get(arm, set())) | ATTACK_MODULES
        assert not missing, f"{arm}@{item}: the run imports {sorted(missing)}, not listed in deps"


def tracked_files(folder: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z", "--", folder], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return [ROOT / name for name in out.stdout.split("\0") if name]


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout: no tracked files to count")
def test_the_lock_hashes_directory_deps_as_a_fresh_clone_holds_them():
    """A directory dep's hash in dvc.lock must cover the tracked files only: a folder hashed with
    byte-code caches in it makes every stage look changed in a fresh clone."""
    stages = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"].values()
    outputs = [Path(o["path"]) for s in stages for o in s.get("outs", [])]
    code_folders = {(d["path"], d["nfiles"], d["size"]) for s in stages for d in s.get("deps", [])
                    if "nfiles" in d and not any(o.is_relative_to(d["path"]) for o in outputs)}
    assert code_folders, "dvc.lock lists no directory code deps"
    for path, nfiles, size in code_folders:
        files = tracked_files(path)
        tracked = (len(files), sum(f.stat().st_size for f in files))
        assert (nfiles, size) == tracked, f"dvc.lock hashes {path} as {nfiles} files / {size} bytes; git tracks {tracked}"
