"""The README's commands run, in order, in one fresh folder, against the installed package (issue 16).

Every ```bash block of README.md (and every ```python block, as `python -c`) is run top to bottom in one empty
temporary folder, each command line as bash would run it there, so a block may use what an earlier one made
(`data/mnist_map`, `runs/intro`, ...) exactly as a reader following the README does. A command that fails is
listed with its exit status and last error line, and the test fails at the end listing them all.

Shrinking (``GTMM_README_SMOKE``, on unless set to 0): sizes only, never the commands themselves, so the whole
README runs in about two minutes on 2 CPU cores:

| command              | flag                         | smoke value                                          |
|----------------------|------------------------------|------------------------------------------------------|
| ``rollouts.collect`` | ``--episodes N``             | min(N, 8), added when absent (default 100)           |
| ``rollouts.collect`` | ``--workers N``              | min(N, 2)                                            |
| ``worldmodel.train`` | ``--steps N`` (updates)      | 2, added when absent (not with ``--resume``)         |
| ``worldmodel.evaluate`` | ``--windows N``           | min(N, 8), added when absent                         |
| ``worldmodel.dream`` | ``--episode-steps N`` / ``--episodes N`` | min(N, 12) / min(N, 2), added when absent        |
| ``agents.train_sb3`` | ``--timesteps N``            | min(N, 512), added when absent (one PPO update)      |
| ``benchmarks/position_probe.py`` | ``--windows N`` / ``--fit-steps N`` | min(N, 16) / min(N, 50), added when absent |

Presets and episode lengths stay as written even when smoke runs: they decide what data a run needs (a preset's
``seq_len`` against the collected episodes' length), so rewriting them would hide exactly the mismatches this test
is for. ``GTMM_README_SMOKE=0`` runs the README as written (hours: its trainings take the preset's 3,000 steps).

Skipped, each with its reason printed (``pytest -s`` shows them): set-up lines (``python3 -m venv``, ``. activate``,
``pip install``: the test runs against the package already installed), ``python -m pytest`` (this test is part of
that suite), and lines that need what a CI machine does not have: ``torchrun`` (several processes, meant for GPUs),
``tensorboard`` (a server that never exits), ``--device cuda`` without CUDA.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SMOKE = os.environ.get("GTMM_README_SMOKE", "1") != "0"
BLOCK = re.compile(r"^```(bash|python)[ \t]*\n(.*?)^```", re.S | re.M)

# -- which blocks and lines ------------------------------------------------------------------------------------------


def blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, code, line number of the opening fence) of every bash/python block, in order."""
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1) for m in BLOCK.finditer(text)]


def bash_lines(code: str, first: int = 1) -> list[tuple[int, str]]:
    """(line number, command line) of a bash block whose first line is line `first`: continuation lines joined
    (numbered by their first line), blanks and whole-line comments dropped."""
    lines, current, start = [], "", None
    for number, raw in enumerate(code.splitlines(), first):
        start = number if start is None else start
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        line = (current + raw).strip()
        if line and not line.startswith("#"):
            lines.append((start, line))
        current, start = "", None
    return lines


def commands(line: str) -> list[list[str]]:
    """A line split into its `&&`-chained commands, each a token list (shell comments dropped)."""
    chain: list[list[str]] = [[]]
    for token in shlex.split(line, comments=True):
        if token == "&&":
            chain.append([])
        else:
            chain[-1].append(token)
    return [c for c in chain if c]


def skip_reason(command: list[str]) -> str | None:
    """Why the test does not run this command here, or None to run it."""
    head = command[0]
    joined = " ".join(command)
    if (head in ("python3", "python") and command[1:3] == ["-m", "venv"]) or head in (".", "source"):
        return "set-up: the test runs against the package already installed"
    if head in ("pip", "pip3") or command[1:3] == ["-m", "pip"]:
        return "set-up: installs (the test runs against the package already installed)"
    if command[1:3] == ["-m", "pytest"]:
        return "the test suite itself (this test is part of it)"
    if head == "torchrun":
        return "torchrun: several processes (DDP, meant for GPUs), not on a CI machine"
    if head == "tensorboard":
        return "tensorboard: a server that does not exit"
    if re.search(r"--device[ =]cuda", joined):
        import torch

        if not torch.cuda.is_available():
            return "--device cuda: no GPU here"
    return None


# -- shrinking: sizes only ---------------------------------------------------------------------------------------------

def _module(command: list[str]) -> str | None:
    if len(command) > 2 and command[0] in ("python", "python3") and command[1] == "-m":
        return command[2]
    return None


def _cap(command: list[str], flag: str, limit: int, add: bool = True) -> list[str]:
    """`flag N` (or `flag=N`) with N capped at `limit`; with `add`, `flag limit` appended when the command leaves
    the flag at its default (which is larger: 100 episodes, 20,000 PPO steps, ...)."""
    out, found = list(command), False
    for i, token in enumerate(out):
        if token == flag and i + 1 < len(out) and out[i + 1].isdigit():
            out[i + 1], found = str(min(int(out[i + 1]), limit)), True
        elif token.startswith(flag + "=") and token.split("=", 1)[1].isdigit():
            out[i], found = f"{flag}={min(int(token.split('=', 1)[1]), limit)}", True
    return out + [flag, str(limit)] if add and not found else out


def shrink(command: list[str]) -> list[str]:
    """The smoke version of one command: the same command with smaller sizes (see the module docstring)."""
    module = _module(command)
    if module == "rollouts.collect":
        # not --steps: episode lengths are cheap, and what a folder holds must stay as written (a collect into an
        # existing folder refuses other lengths; training needs episodes as long as its --seq-len)
        command = _cap(_cap(command, "--episodes", 8), "--workers", 2, add=False)
    elif module == "worldmodel.train":
        command = _cap(command, "--steps", 2, add="--resume" not in command)  # a resume keeps the run's steps
    elif module == "worldmodel.evaluate":
        command = _cap(command, "--windows", 8)
    elif module == "worldmodel.dream":
        # the dream length: --episode-steps, or its old name --steps (an alias)
        flag = "--steps" if "--steps" in command else "--episode-steps"
        command = _cap(_cap(command, flag, 12), "--episodes", 2)
    elif module == "agents.train_sb3":
        command = _cap(command, "--timesteps", 512)
    elif len(command) > 1 and command[1].endswith("position_probe.py"):
        command = _cap(_cap(command, "--windows", 16), "--fit-steps", 50)
    return command


# -- the test ----------------------------------------------------------------------------------------------------------

def _env() -> dict[str, str]:
    """The caller's environment with this interpreter's folder first on PATH (so `python` is the one with the package
    installed) and no PYTHONPATH pointing into the checkout: commands see the installed package, as a reader does."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _last_error(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or "Error" in line]
    return (errors or lines or ["(no output)"])[-1][:400]


# every README command in turn: 455 s beside two trainings, past the suite's 600-s guard beside more; a hang still
# ends it
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_readme_blocks_run_in_order_in_one_folder(tmp_path):
    env = _env()
    probe = subprocess.run(["python", "-c", "import worldmodel, rollouts, envs, agents"], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"the package is not installed for {sys.executable} (pip install -e .): "
                    f"{_last_error(probe.stderr)}")
    # the README runs from a checkout: its `python benchmarks/...` scripts are there beside data/ and runs/
    (tmp_path / "benchmarks").symlink_to(README.parent / "benchmarks", target_is_directory=True)
    found = blocks(README.read_text())
    assert found, f"{README}: no ```bash or ```python block"
    failures, ran, started = [], 0, time.perf_counter()
    for language, code, line_no in found:
        if language == "python":
            runs = [(["python", "-c", code], line_no)]
        else:
            runs = [(command, number) for number, line in bash_lines(code, line_no + 1) for command in commands(line)]
        for command, number in runs:
            where = f"README.md:{number}"
            reason = skip_reason(command) if language == "bash" else None
            if reason is not None:
                print(f"[readme] skip ({where}) {shlex.join(command)}: {reason}")
                continue
            run = shrink(command) if SMOKE and language == "bash" else command
            tick = time.perf_counter()
            proc = subprocess.run(run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            ran += 1
            shown = shlex.join(run) if language == "bash" else f"python block at {where}"
            print(f"[readme] rc {proc.returncode} in {time.perf_counter() - tick:.1f} s ({where}) {shown}")
            if proc.returncode != 0:
                failures.append(f"{where}: `{shown}` exited {proc.returncode}: "
                                f"{_last_error(proc.stderr or proc.stdout)}")
    print(f"[readme] {ran} commands in {time.perf_counter() - started:.0f} s, {len(failures)} failed "
          f"({'smoke sizes' if SMOKE else 'as written'})")
    assert not failures, "README commands that fail when run in order in one folder:\n" + "\n".join(failures)


def test_smoke_rewrites_sizes_only_and_names_each_skip():
    """The shrinking and skipping rules themselves (fast: no command runs)."""
    split = shlex.split
    collect = "python -m rollouts.collect --env mnist_map --episodes {} --steps 128 --out d --workers {}"
    assert shrink(split(collect.format(1000, 64))) == split(collect.format(8, 2))  # not --steps: the episode length
    assert shrink(split("python -m rollouts.collect --env dream --out d")) == split(
        "python -m rollouts.collect --env dream --out d --episodes 8")
    assert shrink(split("python -m worldmodel.train --data d --preset gpu --out r")) == split(
        "python -m worldmodel.train --data d --preset gpu --out r --steps 2")  # the preset stays: it decides seq_len
    for same in ("python -m worldmodel.train --out r --resume", "python -m rollouts.inspect d --gif e.gif"):
        assert shrink(split(same)) == split(same)
    sb3 = "python -m agents.train_sb3 --timesteps={}"
    assert shrink(split(sb3.format(20000))) == split(sb3.format(512))
    chain = "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[dev]'  # set-up"
    assert [c[0] for c in commands(chain)] == ["python3", ".", "pip"]
    for line, fragment in (("pip install torch==2.13.0", "set-up"), ("python -m pytest -q", "the test suite itself"),
                           ("torchrun --nproc_per_node 4 -m worldmodel.train", "several processes"),
                           ("tensorboard --logdir runs", "a server")):
        assert fragment in skip_reason(split(line))
    assert skip_reason(split("python -m rollouts.collect --env mnist_map")) is None
