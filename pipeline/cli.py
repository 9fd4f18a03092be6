"""The ``auror`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from datamodules.data_root import DatasetMissingError
from pipeline.config import ConfigError, load_config

DEFAULT_PARAMS = "params.yaml"


def format_table(results: dict[str, dict[str, float | None]]) -> str:
    metrics = list(next(iter(results.values())))
    width = max(len(m) for m in metrics)
    lines = ["arm".ljust(8) + "".join(m.rjust(width + 2) for m in metrics)]
    for arm, values in results.items():
        cells = ("-" if values[m] is None else f"{values[m]:.3f}" for m in metrics)
        lines.append(arm.ljust(8) + "".join(c.rjust(width + 2) for c in cells))
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.params, args.set)
    from pipeline.experiment import run_experiment  # heavy imports after validation

    start = time.perf_counter()
    results = run_experiment(cfg, args.seeds)
    print()
    if args.seeds and len(args.seeds) > 1:
        print(f"mean over seeds {', '.join(map(str, args.seeds))}:")
    print(format_table(results))
    print(f"\n{time.perf_counter() - start:.1f} s. Final metrics: {Path(cfg.tracking.reports_dir) / 'latest.json'}, "
          f"plot: {Path(cfg.tracking.reports_dir) / 'latest.png'}")
    print(f"Runs: mlflow ui --backend-store-uri {cfg.tracking.tracking_uri}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import run_report

    command = " ".join(["auror", "report", *args.argv])
    md = run_report(args.params, args.set, args.seeds, command)
    print(f"\n{md.read_text()}")
    print(f"Written: {md}, {md.with_suffix('.json')}, {md.with_name(md.stem + '_sr.png')}")
    return 0


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", help=f"YAML params file (default: ./{DEFAULT_PARAMS} when present, else built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set attack.malicious_fraction=0.2 (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                        help="run every arm for each seed and report the mean (default: the config's seed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="auror", description="AUROR: targeted poisoning and its defense in collaborative learning")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the benign, attack and auror arms with one seed and data split")
    add_config_arguments(run)
    run.set_defaults(func=cmd_run)
    report = sub.add_parser("report", help="run the paper's settings for the configured dataset and write "
                            "a Markdown table beside the paper's numbers (e.g. --params configs/mnist.yaml)")
    add_config_arguments(report)
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    args.params = args.params or (DEFAULT_PARAMS if Path(DEFAULT_PARAMS).is_file() else None)
    try:
        if args.seeds and min(args.seeds) < 0:
            raise ConfigError(f"--seeds: must be >= 0, got {min(args.seeds)}")
        return args.func(args)
    except (ConfigError, DatasetMissingError) as err:
        print(f"auror: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("auror: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
