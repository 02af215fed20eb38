"""The Makefile's demos as a user runs them: `make demo-onestep` (the flow demo's model distilled
into a MeanFlow model with its guidance built in, sampled and measured at one evaluation) runs the
demo first when its run is missing. The commands are those `make -n` prints, run with 2 training
steps and 2 samples a class instead of the demo's hundreds."""

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli

REPO = Path(__file__).resolve().parents[1]


def _make_commands(target: str, run: Path) -> list[list[str]]:
    """The ditforge commands (argv without the program) that `make -n TARGET RUN=run` would run, in order."""
    printed = subprocess.run(["make", "--no-print-directory", "-n", target, f"RUN={run}"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
    return [shlex.split(line)[1:] for line in printed.splitlines() if line.startswith(".venv/bin/ditforge ")]


def _short(argv: list[str]) -> list[str]:
    """The same command, cheap: 2 training steps, 2 samples a class."""
    argv = list(argv)
    if argv[0] == "train":
        argv[argv.index("--steps") + 1] = "2"
        argv.append("--no-progress")
    if argv[0] == "eval":
        argv += ["--per-class", "2"]
    return argv


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_demo_onestep_distils_the_demo_run_and_measures_it_at_one_evaluation(tmp_path):
    run = tmp_path / "demo"
    commands = _make_commands("demo-onestep", run)
    # the flow demo first (its run is missing), then the distillation, its picture and its measure
    assert [c[0] for c in commands] == ["train", "sample", "eval", "train", "sample", "eval"]
    assert commands[0][commands[0].index("--objective") + 1] == "flow"
    assert commands[3][commands[3].index("--init-from") + 1] == str(run)
    for argv in commands:
        run_cli(*_short(argv))

    onestep = Path(f"{run}-onestep")
    config = json.loads((onestep / "config.json").read_text())
    assert config["objective"] == "meanflow" and config["init_from"] == str(run)
    assert config["meanflow"]["velocity"] == "teacher" and config["meanflow"]["train_cfg"] == 4.0  # the demo's cfg, built in
    measured = json.loads((onestep / "demo_eval.json").read_text())
    assert measured["nfe"] == 1 and measured["sampler"] == "meanflow" and measured["cfg"] == 4.0
    assert (onestep / "demo_grid.png").is_file()

    # with the demo's run in place, the one-step demo does not train the flow model again
    assert (run / "demo_eval.json").is_file()
    assert [c[0] for c in _make_commands("demo-onestep", run)] == ["train", "sample", "eval"]
