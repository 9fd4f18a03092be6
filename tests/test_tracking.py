import logging
from types import SimpleNamespace

from pipeline.experiment.tracking import ProgressLogger


def rounds_logged(logger: ProgressLogger, rounds: int, caplog) -> list[int]:
    loop = SimpleNamespace(rounds=rounds)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="auror"):
        logger.on_run_start(loop)
        for r in range(1, rounds + 1):
            logger.on_round_end(loop, r, {"accuracy": 0.5, "attack_success_rate": 0.1})
    return [int(rec.getMessage().split("round ")[1].split("/")[0]) for rec in caplog.records]


def test_progress_every_tenth_round_and_the_last(caplog):
    assert rounds_logged(ProgressLogger("benign", quiet_s=3600), 25, caplog) == [10, 20, 25]


def test_progress_on_every_slow_round(caplog):
    assert rounds_logged(ProgressLogger("benign", quiet_s=0), 4, caplog) == [1, 2, 3, 4]
