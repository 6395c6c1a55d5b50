"""Bad input to the commands no other test file drives with a table (dream, train_sb3, report): each gets exit 2,
ONE `error:` line naming the flag or file, no traceback, and nothing is written. (The rollout CLIs' table is in
test_rollouts_trust.py, train's in test_train_robust.py, evaluate's in test_evaluate.py.)

The cases run in-process through the same entry wrapper the commands use (`gtmm.cli.run`), which is what turns an
error into the line and the exit code; two of them also run as real processes, to check the console path."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gtmm import cli
from rollouts.collect import CollectConfig, collect
from worldmodel.config import preset
from worldmodel.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A tiny rollout folder, a 2-step checkpoint, an eval.json of an unknown version and a corrupt one."""
    base = tmp_path_factory.mktemp("cli_errors")
    data = base / "data"
    collect(CollectConfig(env="mnist_map", agent="loop", episodes=4, steps=15, out=data, progress=False))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(dataclasses.replace(preset("debug"), data=str(data), steps=2, out=str(base / "run"), progress=False,
                                  val_every=0, threads=1))
    finally:
        torch.set_num_threads(threads)
    (base / "future").mkdir()
    (base / "future" / "eval.json").write_text(json.dumps({"format": "gtmm-eval", "version": 99, "models": {}}))
    (base / "garbled").mkdir()
    (base / "garbled" / "eval.json").write_text("{not json")
    (base / "empty").mkdir()
    (base / "a_file.txt").write_text("keep me")
    return {"base": base, "data": data, "run": base / "run"}


# (module, args with {placeholders}, a fragment the one line must contain)
CASES = [
    ("worldmodel.dream", ["--checkpoint", "{base}/nope", "--data", "{data}"], "nope"),
    ("worldmodel.dream", ["--checkpoint", "{run}", "--data", "{base}/nope"], "nope"),
    ("worldmodel.dream", ["--checkpoint", "{run}", "--data", "{data}", "--env", "mnist_map"], "--data"),
    ("worldmodel.dream", ["--checkpoint", "{run}", "--data", "{data}", "--episodes", "0"], "--episodes"),
    ("worldmodel.dream", ["--checkpoint", "{run}", "--data", "{data}", "--steps", "0"], "--episode-steps"),  # alias
    ("worldmodel.dream", ["--checkpoint", "{run}", "--data", "{data}", "--episode-steps", "0"], "--episode-steps"),
    ("worldmodel.dream", ["--checkpoint", "{run}", "--data", "{data}", "--temperature", "-1"], "--temperature"),
    ("worldmodel.dream", ["--checkpoint", "{run}", "--data", "{data}", "--agent", "nope"], "nope"),
    ("worldmodel.dream", ["--checkpoint", "{run}", "--data", "{data}", "--agent", "sb3"], "--policy"),
    ("worldmodel.dream", ["--checkpoint", "{run}", "--env", "mnist_map", "--env-kwargs", "{{"], "--env-kwargs"),
    ("worldmodel.dream", ["--checkpoint", "{base}/a_file.txt", "--data", "{data}"], "a_file.txt"),
    ("worldmodel.dream", ["--checkpoint", "{run}", "--data", "{data}", "--out", "{base}/a_file.txt/x.gif"], "a_file.txt"),
    ("worldmodel.dream", ["--checkpoint", "{run}", "--data", "{data}", "--bogus"], "--bogus"),
    ("agents.train_sb3", ["--timesteps", "0", "--out", "{base}/p.zip"], "--timesteps"),
    ("agents.train_sb3", ["--env", "nope", "--out", "{base}/p.zip"], "nope"),
    ("agents.train_sb3", ["--env-kwargs", "[1]", "--out", "{base}/p.zip"], "--env-kwargs"),
    ("agents.train_sb3", ["--env-kwargs", '{{"grid": true}}', "--out", "{base}/p.zip"], "grid"),
    ("agents.train_sb3", ["--env-kwargs", '{{"nope": 1}}', "--out", "{base}/p.zip"], "nope"),
    ("agents.train_sb3", ["--out", "{base}/policy.txt"], "--out"),
    ("agents.train_sb3", ["--reward", "nope", "--out", "{base}/p.zip"], "--reward"),
    ("agents.train_sb3", ["--num-envs", "0", "--out", "{base}/p.zip"], "--num-envs"),
    ("agents.train_sb3", ["--threads=-1", "--out", "{base}/p.zip"], "--threads"),
    ("worldmodel.report", ["{base}/nope", "--out", "{base}/report"], "nope"),
    ("worldmodel.report", ["{base}/empty", "--out", "{base}/report"], "empty"),
    ("worldmodel.report", ["{base}/future", "--out", "{base}/report"], "version"),
    ("worldmodel.report", ["{base}/garbled", "--out", "{base}/report"], "garbled"),
    # a choice list that tyro wraps onto a second line of its box comes out whole
    ("worldmodel.train", ["--data", "{data}", "--read-target", "place", "--out", "{base}/r"], "one of ('pose', 'frame')"),
]


def _fill(args: list[str], made: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in made.items()}) for a in args]


def _listing(base: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(base)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(base.rglob("*")) if p.is_file() and ".cache" not in p.parts}


@pytest.mark.parametrize("module, args, fragment", CASES, ids=[f"{m.split('.')[-1]}:{' '.join(a)}" for m, a, _ in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(made, capsys, module, args, fragment):
    import importlib

    before = _listing(made["base"])
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_:
        cli.run(main, _fill(args, made))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment.format() in lines[0], lines[0]
    assert "Traceback" not in err
    assert _listing(made["base"]) == before  # nothing written, nothing changed


@pytest.mark.parametrize("module, args", [
    ("worldmodel.dream", ["--checkpoint", "{base}/nope", "--data", "{data}"]),
    ("worldmodel.report", ["{base}/garbled", "--out", "{base}/report"]),
])
def test_as_real_processes(made, module, args):
    result = subprocess.run([sys.executable, "-m", module, *_fill(args, made)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
