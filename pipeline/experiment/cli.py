"""The ``auror`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from datamodules.data_root import DatasetMissingError
from pipeline.core.errors import CellsFailed
from pipeline.experiment.config import (MAX_SEED, ConfigError, check_name, check_output_folders, first_repeat,
                                       load_config)
from pipeline.experiment.storage import STUDY_STORAGE, SWEEP_STORAGE, database_url, hide_password, scrub

DEFAULT_PARAMS = "params.yaml"


def where_runs_are(tracking_uri: str) -> str:
    """How to look at the runs: the server's address, or the ``mlflow ui`` command for a local store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{hide_password(tracking_uri)} (the MLflow tracking server)"
    return f"mlflow ui --backend-store-uri {hide_password(tracking_uri)}"


def format_table(results: dict[str, dict[str, float | None]]) -> str:
    metrics = list(next(iter(results.values())))
    width = max(len(m) for m in metrics)
    arm_width = max(len(arm) for arm in [*results, "arm"])  # defense names run to 18 characters
    lines = ["arm".ljust(arm_width) + "".join(m.rjust(width + 2) for m in metrics)]
    for arm, values in results.items():
        cells = ("-" if values[m] is None else f"{values[m]:.3f}" for m in metrics)
        lines.append(arm.ljust(arm_width) + "".join(c.rjust(width + 2) for c in cells))
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.experiment.arms import DEFAULT_ARMS, check_arms

    cfg, invocation = args.cfg, None
    check_arms(cfg, args.arms or DEFAULT_ARMS)  # before the run's imports (MLflow, Lightning): refused at once
    from pipeline.experiment.run import run_experiment

    if args.resume is not None:
        given = [name for name, value in (("--set", args.set), ("--seeds", args.seeds), ("--arms", args.arms)) if value]
        if given:
            raise ConfigError(f"--resume: runs the interrupted run's own config, seeds and arms; drop {given[0]}")
        from pipeline.experiment.resume import open_invocation  # --params (or ./params.yaml) only says where to look

        invocation = open_invocation(args.resume, cfg)
        cfg, args.seeds, args.arms = invocation.cfg, invocation.seeds, invocation.arms
    start = time.perf_counter()
    results = run_experiment(cfg, args.seeds, arms=args.arms or DEFAULT_ARMS, resume=invocation)
    print(f"\nmean over seeds {', '.join(map(str, args.seeds))}:" if args.seeds and len(args.seeds) > 1 else "")
    print(format_table(results))
    reports = Path(cfg.tracking.reports_dir)
    print(f"\n{time.perf_counter() - start:.1f} s. Final metrics: {reports / 'latest.json'}, plot: {reports / 'latest.png'}")
    print(f"Runs: {where_runs_are(cfg.tracking.tracking_uri)}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from pipeline.experiment.arms import prepare_dataset

    path = prepare_dataset(args.cfg)
    print(f"{args.cfg.data.name} ready: {path.read_text().strip()}\nWritten: {path}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from pipeline.experiment.tune import StudySpec, run_study

    if args.seeds and len(args.seeds) > 1:
        raise ConfigError("--seeds: auror tune runs one seed per trial; give one seed (or --set seed=N)")
    cfg = dataclasses.replace(args.cfg, seed=args.seeds[0]) if args.seeds else args.cfg
    result = run_study(StudySpec(cfg, args.kind, args.defense, args.n_trials, args.storage, args.study_name,
                                 args.max_malicious_fraction))
    study = result.study
    print(f"\nstudy {study.study_name}: {len(study.trials)} trials in {hide_password(result.storage)}")
    if result.best_params_path is not None:
        best = study.best_trial
        print(f"best: trial {best.number}, objective {best.value:.4f}")
        for key, value in best.user_attrs.get("metrics", {}).items():
            print(f"  {key:20} {'-' if value is None else f'{value:.3f}'}")
        print("  " + "\n  ".join(best.user_attrs["overrides"] or ["(the configured setting)"]))
        print(f"Best params: {result.best_params_path}  (auror run --params {result.best_params_path})")
    print(f"Runs: {where_runs_are(cfg.tracking.tracking_uri)} (parent run {result.parent_run_id})")
    return 0


def cmd_worst_case(args: argparse.Namespace) -> int:
    from pipeline.experiment.worst_case import run_worst_case

    if args.seeds and len(args.seeds) > 1:
        raise ConfigError("--seeds: auror worst-case runs one seed per trial; give one seed (or --set seed=N)")
    cfg = dataclasses.replace(args.cfg, seed=args.seeds[0]) if args.seeds else args.cfg
    md = run_worst_case(cfg, args.defenses, args.attacks, args.n_trials, args.storage, args.name, command_line(args),
                        args.report_only)
    print_written(md)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.experiment.report import run_report

    md = run_report(args.cfg, args.seeds, command_line(args), from_dir=args.from_dir)
    print_written(md, md.with_name(md.stem + "_sr.png"))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pipeline.experiment.compare import compare_grid

    if args.report_only and args.no_report:
        raise ConfigError("--no-report: with --report-only there is nothing left to do; drop one")
    cfg = args.cfg
    grid = compare_grid(cfg, args.seeds or [cfg.seed], args.arms, args.attacks, args.name, key_code(args))
    sweep_name = check_name("--sweep-name", args.sweep_name or f"compare-{cfg.data.name}")
    if not args.no_report:
        grid.check_report("give --name NAME to write this comparison's report as NAME.md beside it")
    if not args.report_only:
        grid.run(args.storage, sweep_name, track=not args.no_track)
    if args.no_report:
        print(f"\nCells: {grid.store.root}")
    else:
        print_written(grid.write_report(command_line(args)))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipeline.experiment.arms import DEFAULT_ARMS
    from pipeline.experiment.compare import sweep_grid

    cfg = args.cfg
    grid = sweep_grid(cfg, args.grid, args.seeds or [cfg.seed], args.arms or list(DEFAULT_ARMS), args.sweep_name,
                      key_code(args))
    grid.check_report("give another --sweep-name")
    if not args.report_only:
        grid.run(args.storage, grid.report.name, track=not args.no_track)
    print_written(grid.write_report(command_line(args)))
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from pipeline.experiment.diagnose import run_diagnosis

    name = check_name("--name", args.name or args.cfg.data.name)
    print_written(run_diagnosis(args.cfg, args.set, args.seeds or [args.cfg.seed], args.defenses, name))
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The command as typed (the reports name it)."""
    return " ".join(["auror", args.command, *args.argv])


def key_code(args: argparse.Namespace) -> str | None:
    from pipeline.experiment.grid import code_version

    code = code_version() if args.key_includes_code else None
    if args.key_includes_code and code is None:
        raise ConfigError("--key-includes-code: not a git checkout (git describe failed); drop the option")
    return code


def print_written(md: Path, plot: Path | None = None) -> None:
    print(f"\n{md.read_text()}")
    print(f"Written: {md}, {md.with_name(md.stem + '.json')}, {plot or md.with_name(md.stem + '.png')}")


def add_sweep_arguments(parser: argparse.ArgumentParser, default_name: str) -> None:
    parser.add_argument("--storage", help="where workers claim cells: sqlite:///<file> on one machine (default "
                        "sqlite:///mlruns/sweeps.db), postgresql://<user>@<host>:<port>/<db> shared by many "
                        "(pip install -e '.[postgres]')")
    parser.add_argument("--sweep-name", help=f"the sweep's name in the storage (default {default_name}); "
                        "workers with the same name and cells split them")
    parser.add_argument("--no-track", action="store_true",
                        help="log no MLflow runs (faster; the cells' metrics are still stored)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: build the report from the finished cells (the missing ones listed)")
    parser.add_argument("--key-includes-code", action="store_true",
                        help="key every cell by its config and the code version (git describe): a new commit "
                             "makes new cells (default: the config alone)")


def add_study_storage(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", help="Optuna storage: sqlite:///<file> (default sqlite:///mlruns/optuna.db) or "
                        "postgresql://<user>@<host>:<port>/<db>, shared by workers on many machines")


def print_registry(registry: dict, note: Callable[[type], str] = lambda cls: "") -> None:
    """One line per plug-in: its name, its summary and ``note``."""
    width = max(map(len, registry))
    for name, cls in registry.items():
        print(f"{name.ljust(width)}  {cls.summary}{note(cls)}")


def cmd_defenses(args: argparse.Namespace) -> int:
    from pipeline.defenses import REGISTRY

    print_registry(REGISTRY)
    print("\nEach is an arm of auror run (--arms benign attack auror krum ...), with its parameters in the "
          "config section defense.<name>; none is the attack arm's aggregation.")
    return 0


def cmd_attacks(args: argparse.Namespace) -> int:
    from pipeline.attacks import REGISTRY

    print_registry(REGISTRY, lambda attack: " [omniscient]" if attack.omniscient else "")
    print("\nChoose one with --set attack.name=<name>; its parameters are the config section attack.<name>, the "
          "shared ones (source_class, target_class, malicious_epochs, boost...) are in attack.")
    return 0


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", help=f"YAML params file (default: ./{DEFAULT_PARAMS} when present, else built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set users.malicious_fraction=0.2 (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                        help="run every arm for each seed and report the mean (default: the config's seed)")


class UsageError(ConfigError):
    """A bad command-line argument (argparse's message, on one line)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (``auror: error: ...``, exit 2) instead of usage + error."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="auror", description="AUROR: targeted poisoning and its defense in collaborative learning")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the benign, attack and defense arms with one seed and data split")
    add_config_arguments(run)
    run.add_argument("--arms", nargs="+", metavar="ARM",
                     help="the arms to run: benign, attack, and any defense of `auror defenses` (default: benign "
                          "attack auror); without benign, accuracy_drop is left empty")
    run.add_argument("--resume", metavar="ID",
                     help="continue an interrupted run: the id it printed, its checkpoint folder, or the MLflow "
                          "run id of one of its arms")
    run.set_defaults(func=cmd_run)
    prepare = sub.add_parser("prepare", help="download (when data.download) and decode the configured dataset; "
                             "write <reports_dir>/data.json with its sizes")
    add_config_arguments(prepare)
    prepare.set_defaults(func=cmd_prepare)
    tune = sub.add_parser("tune", help="Optuna study: tune a defense's parameters against the attack "
                          "(--kind defense) or the attack against a defense (--kind attack)")
    add_config_arguments(tune)
    tune.add_argument("--kind", default="defense", help="defense (default) | attack")
    tune.add_argument("--defense", default="auror",
                      help="the defense tuned (--kind defense) or attacked (--kind attack, compositions such as "
                           "nnm+median too); default auror")
    tune.add_argument("--n-trials", type=int, default=20,
                      help="the study's total of finished trials (a trial that repeats a tried setting not counted); "
                           "re-running continues up to it (default 20)")
    add_study_storage(tune)
    tune.add_argument("--study-name", help="resume this study when it exists (default: <kind>-<dataset>)")
    tune.add_argument("--max-malicious-fraction", type=float,
                      help="attack study: at most this fraction of malicious users (default: the configured one)")
    tune.set_defaults(func=cmd_tune)
    worst = sub.add_parser("worst-case", help="each defense against its worst attacker: per (defense, attack) pair "
                           "an Optuna study of the attack's knobs (the attackers fixed by the setting) maximising its "
                           "success; resumable, split between workers that share --storage; writes "
                           "worst_case_<dataset>.md/.json/.png")
    add_config_arguments(worst)
    worst.add_argument("--defenses", nargs="+", metavar="DEFENSE",
                       help="the defenses judged, compositions such as nnm+median too (default: every registered one)")
    worst.add_argument("--attacks", nargs="+", metavar="ATTACK",
                       help="the attacks searched (default: every attack with knobs to search)")
    worst.add_argument("--n-trials", type=int, default=10,
                       help="each study's total of finished trials, trial 0 the configured knobs, a trial that repeats "
                            "a tried setting not counted (default 10)")
    add_study_storage(worst)
    worst.add_argument("--name", help="the search's name (default worst_case_<dataset>): its report <NAME>.md/.json/"
                       ".png and its studies worst-<attack>-<defense>-<NAME without worst_case_>; another setting "
                       "(--set users.partition=dirichlet) needs a name of its own")
    worst.add_argument("--report-only", action="store_true",
                       help="run nothing: build the report from the trials the storage holds (a search under way "
                            "or stopped: each pair's finished trials are stated)")
    worst.set_defaults(func=cmd_worst_case)
    report = sub.add_parser("report", help="run the paper's settings for the configured dataset and write "
                            "a Markdown table beside the paper's numbers (e.g. --params configs/mnist.yaml)")
    add_config_arguments(report)
    report.add_argument("--from", dest="from_dir", metavar="DIR",
                        help="build the table from the DVC stages' outputs under DIR instead of running")
    report.set_defaults(func=cmd_report)
    compare = sub.add_parser("compare", help="every defense against every attack on the same data and seeds "
                             "(label flipping: IID 10/20/30%% and Dirichlet(0.5) 30%% malicious; other attacks: IID "
                             "and Dirichlet(0.5) 30%%); resumable; writes compare_<dataset>.md/.json/.png")
    add_config_arguments(compare)
    compare.add_argument("--arms", nargs="+", metavar="ARM",
                         help="run only these arms' cells (default: benign, attack and every defense)")
    compare.add_argument("--attacks", nargs="+", metavar="ATTACK",
                         help="run only these attacks' cells (default: every attack of `auror attacks`; label_flip "
                              "on the four settings, the others on IID 30%% and Dirichlet(0.5) 30%%)")
    compare.add_argument("--name", help="the report's name: <NAME>.md/.json/.png (default compare_<dataset>)")
    add_sweep_arguments(compare, "compare-<dataset>")
    compare.add_argument("--no-report", action="store_true",
                         help="run the cells only (the DVC stages of one arm); the report comes from --report-only")
    compare.set_defaults(func=cmd_compare)
    sweep = sub.add_parser("sweep", help="arms x every combination of --grid values x seeds, split between "
                           "the workers that share --storage; writes <sweep-name>.md/.json/.png")
    add_config_arguments(sweep)
    sweep.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                       help="config keys and their values, e.g. users.malicious_fraction=0.1,0.3 defense.auror.tau=0.5,0.8")
    sweep.add_argument("--arms", nargs="+", metavar="ARM", help="the arms of every cell (default: benign attack auror)")
    add_sweep_arguments(sweep, "sweep-<dataset>")
    sweep.set_defaults(func=cmd_sweep)
    diagnose = sub.add_parser("diagnose", help="benign, attack and --defenses on one setting: per user, what the "
                              "attack changed and each detector's score; DR over the effective attackers; writes "
                              "diagnose_<name>.md/.json/.png")
    add_config_arguments(diagnose)
    diagnose.add_argument("--defenses", nargs="+", metavar="DEFENSE", default=["auror", "auror_noniid"],
                          help="the defenses to run (default: auror auror_noniid)")
    diagnose.add_argument("--name", help="the report's name: diagnose_<name>.* (default: the dataset)")
    diagnose.set_defaults(func=cmd_diagnose)
    defenses = sub.add_parser("defenses", help="list the registered defenses (each is an arm of auror run)")
    defenses.set_defaults(func=cmd_defenses)
    attacks = sub.add_parser("attacks", help="list the registered attacks (e.g. --set attack.name=backdoor)")
    attacks.set_defaults(func=cmd_attacks)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv[1:]
        # a tracking server that stops answering mid-run: an error in seconds, not after MLflow's minutes of retries
        for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                            ("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")):
            os.environ.setdefault(name, value)
        # every line out at once, also into a file or a pipe: a run killed early still shows its --resume id
        sys.stdout.reconfigure(line_buffering=True)
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
        if hasattr(args, "params"):  # parsed and validated once, here; a resumed run reads its own
            args.params = args.params or (DEFAULT_PARAMS if Path(DEFAULT_PARAMS).is_file() else None)
            args.cfg = load_config(args.params, [] if getattr(args, "resume", None) else args.set)
            check_output_folders(args.cfg)
        bad_seeds = [s for s in getattr(args, "seeds", None) or [] if not 0 <= s <= MAX_SEED]
        if bad_seeds:
            raise ConfigError(f"--seeds: must be in [0, {MAX_SEED}], got {bad_seeds[0]}")
        for option in ("seeds", "arms", "attacks", "defenses"):  # a value twice would run twice, or be dropped unsaid
            repeated = first_repeat(getattr(args, option, None) or [])
            if repeated is not None:
                raise ConfigError(f"--{option}: {repeated} is given twice")
        if getattr(args, "storage", None) is not None:  # every command refuses a bad URL first, the same way
            database_url(args.storage, "--storage")
        return args.func(args)
    except (ConfigError, DatasetMissingError) as err:
        print(f"auror: error: {err}", file=sys.stderr)
        return 2
    except CellsFailed as err:
        print(f"auror: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # a server lost mid-run is one line and exit 3; anything else is a bug: its traceback
        lost = lost_server(err, args)
        if lost is None:
            raise
        server, url, cause = lost
        resume_id = getattr(err, "resume_id", None)  # set by run_experiment on the way out
        again = f"auror run --resume {resume_id}" if resume_id else "the same command"
        reason = scrub((str(cause).strip().splitlines() or [type(cause).__name__])[0][:160], url)
        print(f"auror: error: lost the connection to {server} {hide_password(url)} ({reason}); what finished is "
              f"recorded: run {again} to continue once it is back", file=sys.stderr)
        return 3
    except KeyboardInterrupt as err:
        resume_id = getattr(err, "resume_id", None)  # pipeline.experiment.resume.RunInterrupted
        print("auror: interrupted" + (f"; the finished rounds are saved, continue with: auror run --resume "
                                      f"{resume_id}" if resume_id else ""), file=sys.stderr)
        return 130


def lost_server(err: BaseException, args: argparse.Namespace) -> tuple[str, str, BaseException] | None:
    """``(what, url, the error that says so)`` of the server that ``err`` (or an error it came from) lost the
    connection to: the storage of cells or trials (a database error) or the MLflow tracking server (a
    request that failed); ``None`` for any other error."""
    sa, requests, mlflow = (sys.modules.get(name) for name in ("sqlalchemy", "requests", "mlflow"))
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    tracking = args.cfg.tracking.tracking_uri if getattr(args, "cfg", None) else ""
    for e in chain:
        if sa is not None and isinstance(e, (sa.exc.OperationalError, sa.exc.InterfaceError)):
            if args.command in ("compare", "sweep", "report", "tune", "worst-case"):
                return "the storage", getattr(args, "storage", None) or (
                    STUDY_STORAGE if args.command in ("tune", "worst-case") else SWEEP_STORAGE), e
            return "the tracking store", tracking, e
        if (requests is not None and isinstance(e, requests.exceptions.RequestException)) or (
                mlflow is not None and isinstance(e, mlflow.exceptions.MlflowException) and "API request" in str(e)):
            return "the MLflow tracking server", tracking, e
    return None


if __name__ == "__main__":
    sys.exit(main())
