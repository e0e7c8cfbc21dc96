"""Progress of long work: a bar on a terminal, log lines otherwise, nothing with --quiet."""

import io
import logging

import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core import progress
from mlx_harmony_core.cli import main
from mlx_harmony_core.progress import ProgressBar

LOGGER = "mlx_harmony_core.progress"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _reset():
    yield
    progress.set_quiet(False)
    progress.log_only(False)


def run_bar(total: int = 100, **kw) -> None:
    with ProgressBar(total, "work", unit="tok", **kw) as bar:
        for _ in range(total):
            bar.update(1)


def test_not_a_terminal_logs_lines_and_draws_no_bar(capsys, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    run_bar()
    assert capsys.readouterr().err == ""
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert lines[0].startswith("work: 10%") and lines[-1].startswith("work: 100%")
    assert len(lines) == 10


def test_a_terminal_gets_a_bar_unless_quiet_or_log_only(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    term = Terminal()
    monkeypatch.setattr("sys.stderr", term)
    bar = ProgressBar(10, "work", unit="tok")
    assert bar.bar is not None  # tqdm, drawn on stderr
    bar.close()
    progress.set_quiet(True)
    run_bar()
    assert not caplog.records  # quiet: no bar and no lines
    progress.set_quiet(False)
    progress.log_only(True)  # serve: lines even on a terminal
    assert ProgressBar(10, "work").bar is None
    run_bar()
    assert len([r for r in caplog.records if r.name == LOGGER]) == 10


def test_small_work_shows_nothing(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    run_bar(total=5, min_total=6)
    assert not caplog.records


def test_loading_a_directory_reports_progress(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setattr("mlx_harmony_core.models.load.BIG_FILE", 1)
    engine = mhc.load("demo")
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert lines and lines[-1].startswith("loading ") and "100%" in lines[-1]
    assert engine.generate([{"role": "user", "content": "hi"}], max_tokens=2).usage


def test_sharded_test_model_writing_reports_progress(monkeypatch, caplog, tmp_path):
    from mlx_harmony_core.models import builder

    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setattr(builder, "_SHARD_PARAMS", 0)  # the gpt-oss-20b preset's path
    builder.make_test_model(tmp_path / "m", preset="demo", seed=0)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert lines[-1].startswith("writing ") and "100%" in lines[-1]
    assert list((tmp_path / "m").glob("model-*-of-*.safetensors"))


@pytest.mark.parametrize("quiet", [False, True])
def test_generate_long_prefill_no_bar_off_a_terminal_and_quiet(capsys, caplog, quiet):
    caplog.set_level(logging.INFO, logger=LOGGER)
    prompt = " ".join(f"word{i}" for i in range(600))
    argv = ["generate", "--model", "demo", "--max-tokens", "2"]
    argv += ["--quiet"] * quiet + ["--prompt", prompt]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "prefill" not in err and "\r" not in err  # no bar off a terminal
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    if quiet:
        assert lines == []
    else:
        assert lines and lines[-1].startswith("prefill: 100%")
