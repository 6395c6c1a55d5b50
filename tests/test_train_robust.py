"""`worldmodel.train` under faults and bad input (issue 10) and its validation (issue 11 item 7), end to end at tiny
sizes: bad flags exit 2 with one line before training starts, two runs never share a run folder, SIGINT/SIGTERM
save the step they interrupt and the run resumes from it, `--resume` finishes the run as configured, and held-out
validation keeps best.pt without breaking exact resume."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from gtmm import cli
from worldmodel import checkpoint
from worldmodel.config import preset
from worldmodel.train import explicit_fields, main, parse_args, train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TRAIN = [sys.executable, "-m", "worldmodel.train"]


def collect(out: Path, episodes: int, seed: int) -> Path:
    """A tiny MNIST-map rollout folder (2x2 maps, 9-step walks: 10 frames per episode) from the real collector."""
    proc = subprocess.run([sys.executable, "-m", "rollouts.collect", "--env", "mnist_map", "--out", str(out),
                           "--episodes", str(episodes), "--steps", "9", "--seed", str(seed), "--env-kwargs",
                           json.dumps({"grid": 2}), "--no-progress"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"train": collect(root / "train", 6, 0), "other": collect(root / "other", 6, 5),
            "single": collect(root / "single", 1, 0)}


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """The CLI in this process (`cli.run(main, argv)`): exit code, stdout, stderr."""
    with pytest.raises(SystemExit) as exit_:
        cli.run(main, argv)
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def debug_config(out: Path, data: Path, **kw):
    return dataclasses.replace(preset("debug"), data=str(data), out=str(out), progress=False, threads=1, **kw)


# -- bad input: one line, exit 2, before training starts, nothing written ---------------------------------------------

D = ["--data", "DATA"]  # the tiny collected dataset
BAD_INPUTS = [
    # (id, flags after --preset debug --out OUT --threads 1, a fragment of the one error line)
    ("steps0", D + ["--steps", "0"], "--steps 0: expected >= 1"),
    ("batch0", D + ["--batch", "0"], "--batch 0: expected >= 1"),
    ("seqlen0", D + ["--seq-len", "0"], "--seq-len 0: expected >= 1"),
    ("negative_lr", D + ["--lr=-0.1"], "--lr -0.1: expected a number > 0"),
    ("grad_clip0", D + ["--grad-clip", "0"], "--grad-clip 0.0: expected a number > 0"),
    ("negative_free_nats", D + ["--free-nats=-1"], "--free-nats -1.0: expected a number >= 0"),
    ("negative_val_every", D + ["--val-every=-1"], "--val-every -1: expected >= 0"),
    ("val_windows0", D + ["--val-windows", "0"], "--val-windows 0: expected >= 1"),
    ("val_fraction1", D + ["--val-fraction", "1"], "--val-fraction 1.0: expected in [0, 1)"),
    ("negative_threads", D + ["--threads=-1"], "--threads -1: expected >= 0"),
    ("kl_balance", D + ["--kl-balance", "2"], "--kl-balance 2.0: expected in [0, 1]"),
    ("unknown_memory", D + ["--memory", "tape"], "--memory 'tape'"),
    ("unknown_preset", D + ["--preset", "huge"], "unknown preset 'huge'"),
    ("bad_json", D + ["--memory-kwargs", "{store_h"], "--memory-kwargs: '{store_h' is not valid JSON"),
    ("json_not_object", D + ["--address-kwargs", "[1]"], "--address-kwargs: expected a JSON object"),
    ("unknown_memory_kwarg", D + ["--memory-kwargs", '{"colour": 1}'],
     "--memory-kwargs: unknown argument(s) ['colour'] for memory 'introspective'; accepted: "),
    ("kwargs_for_no_memory", D + ["--memory", "none", "--memory-kwargs", '{"store_h": true}'],
     "for memory 'none'; accepted: none (it takes no arguments)"),
    ("unknown_address_kwarg", D + ["--address", "actions", "--address-kwargs", '{"speed": 2}'],
     "--address-kwargs: unknown argument(s) ['speed'] for address 'actions'; accepted: "),
    ("unknown_address", D + ["--address", "gps"], "--address 'gps': expected auto or one of"),
    # --address auto (the default) resolves from the data first, then checks the merged kwargs the same way
    ("unknown_auto_address_kwarg", D + ["--address-kwargs", '{"speed": 2}'],
     "--address-kwargs: unknown argument(s) ['speed'] for address 'actions'; accepted: "),
    ("address_kwarg_not_a_number", D + ["--address-kwargs", '{"step_scale": "big"}'],
     "--address-kwargs: step_scale='big' for address 'actions': expected a number"),
    ("memory_kwarg_not_a_flag", D + ["--memory-kwargs", '{"content_address": "yes"}'],
     "--memory-kwargs: content_address='yes' for memory 'introspective': expected true or false"),
    ("se2_moves_not_pairs", D + ["--address-kwargs", '{"integrator": "se2", "moves": 5}'],
     "address 'actions' (se2): moves needs 4 finite [turn, forward] pairs, got 5"),
    ("auto_address_kwarg_for_hidden", ["--task", "perfect_recall", "--address-kwargs", '{"integrator": "gru"}'],
     "--address-kwargs: unknown argument(s) ['integrator'] for address 'hidden'"),
    ("seq_len_too_long", D + ["--seq-len", "50"],
     "--seq-len 50: the longest training episode in DATA has 10 frames; pass --seq-len 10 or less"),
    ("device_name", D + ["--device", "tpu"], "--device 'tpu': expected auto, cpu, cuda or cuda:N"),
    ("resume_nothing", D + ["--resume"], "--resume: no checkpoint"),
    ("data_missing", ["--data", "DATA/nowhere"], "--data DATA/nowhere: no such folder"),
    ("data_not_rollouts", ["--data", "EMPTY"], "is not a rollout folder"),
    ("no_data_no_task", [], "give exactly one of --data"),
    ("data_and_task", D + ["--task", "perfect_recall"], "give exactly one of --data"),
    ("unknown_task", ["--task", "sorting"], "--task 'sorting'"),
    ("pose_without_pose", ["--task", "perfect_recall", "--address", "pose"],
     "--address pose: the data (task:perfect_recall"),
    ("out_is_a_file", D + ["--out", "FILE"], "--out FILE: is a file, expected a run folder"),
] + ([] if torch.cuda.is_available() else
      [("no_cuda", D + ["--device", "cuda"], "--device cuda: CUDA is not available")])


# the rows also run as real processes: one of each place an error can come from (flag values, argv spelling, JSON,
# component kwargs, the data folder, the task, the run folder, the device, resume); all rows run in-process below
IN_A_PROCESS = ("steps0", "negative_lr", "bad_json", "unknown_memory_kwarg", "seq_len_too_long", "data_not_rollouts",
                "unknown_task", "out_is_a_file", "device_name", "resume_nothing")
PROCESS_ROWS = [row for row in BAD_INPUTS if row[0] in IN_A_PROCESS]


@pytest.fixture(scope="module")
def bad_input_paths(tmp_path_factory, data) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "file").write_text("not a run folder\n")
    return {"ROOT": str(root), "DATA": str(data["train"]), "EMPTY": str(root / "empty"), "FILE": str(root / "file")}


def bad_argv(name: str, flags: list[str], paths: dict[str, str]) -> tuple[list[str], Path]:
    out = Path(paths["ROOT"]) / name
    flags = [paths.get(f, f.replace("DATA", paths["DATA"])) for f in flags]
    return ["--preset", "debug", "--out", str(out), "--threads", "1", *flags], out


def check_bad_input(name: str, fragment: str, code: int, stdout: str, stderr: str, out: Path,
                    paths: dict[str, str]) -> None:
    fragment = fragment.replace("DATA", paths["DATA"]).replace("FILE", paths["FILE"])
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr and fragment in lines[0], lines[0]
    assert "[train] step" not in stdout and "[train] rollouts" not in stdout  # it failed before training
    if name == "out_is_a_file":
        assert Path(paths["FILE"]).read_text() == "not a run folder\n"
    else:
        assert not out.exists(), f"{out} was left behind"  # no empty run folder, no lock file


@pytest.mark.parametrize("name,flags,fragment", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_before_training(name, flags, fragment, bad_input_paths, capsys):
    argv, out = bad_argv(name, flags, bad_input_paths)
    code, stdout, stderr = run_main(argv, capsys)
    check_bad_input(name, fragment, code, stdout, stderr, out, bad_input_paths)


@pytest.fixture(scope="module")
def bad_input_processes(bad_input_paths) -> dict[str, subprocess.CompletedProcess]:
    """The IN_A_PROCESS rows as real `python -m worldmodel.train` processes, two at a time (startup dominates)."""
    def one(row):
        name, flags, _ = row
        argv, _ = bad_argv(name + "_process", flags, bad_input_paths)
        return name, subprocess.run(TRAIN + argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, PROCESS_ROWS))


@pytest.mark.slow  # ten interpreter start-ups (~10 s on two idle cores); the in-process table covers every row
@pytest.mark.parametrize("name,flags,fragment", PROCESS_ROWS, ids=[row[0] for row in PROCESS_ROWS])
def test_bad_input_in_a_real_process(name, flags, fragment, bad_input_paths, bad_input_processes):
    proc = bad_input_processes[name]
    out = Path(bad_input_paths["ROOT"]) / (name + "_process")
    check_bad_input(name, fragment, proc.returncode, proc.stdout, proc.stderr, out, bad_input_paths)


def test_explicit_fields_reads_every_flag_spelling():
    argv = ["--preset", "debug", "--seq-len=5", "--lr", "0.1", "--no-progress", "--memory_kwargs", "{}",
            "--out", "x", "--resume", "--", "--batch"]
    assert explicit_fields(argv) == {"preset", "seq_len", "lr", "progress", "memory_kwargs", "out", "resume"}
    assert explicit_fields(["--debug", "--no-resume", "--no-lr"]) == {"resume"}  # --debug is cli.run's; lr no bool


# -- one run folder, one run ------------------------------------------------------------------------------------------

def wait_for_lines(proc: subprocess.Popen, count: int, prefix: str = "[train] step") -> list[str]:
    """Read the child's stdout until `count` lines start with `prefix` (its periodic log lines)."""
    seen, lines = 0, []
    while seen < count:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the run ended early: {''.join(lines)}{proc.stderr.read()}")
        lines.append(line)
        seen += line.startswith(prefix)
    return lines


def test_two_runs_into_one_folder_the_second_is_refused(tmp_path, data):
    out = tmp_path / "run"
    flags = ["--preset", "debug", "--data", str(data["train"]), "--out", str(out), "--threads", "1", "--log-every",
             "10", "--val-every", "0", "--image-every", "1000", "--ckpt-every", "1000"]
    first = subprocess.Popen(TRAIN + flags + ["--steps", "200"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for_lines(first, 1)  # it holds the lock and is training
        second = subprocess.run(TRAIN + flags + ["--steps", "5"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                                timeout=240)
        assert first.poll() is None, "the first run ended before the second tried: raise its --steps"
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert lines[0].startswith(f"error: {out} is in use by another process (train, pid {first.pid}"), lines[0]
        rest, err = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    assert json.loads(rest.strip().splitlines()[-1])["step"] == 200
    assert checkpoint.load_raw(out)["step"] == 200 and not (out / ".gtmm.lock").exists()


# -- signals: finish the step, save it, exit 128 + signal, resume from it ----------------------------------------------

@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_the_current_step_and_the_run_resumes_from_it(tmp_path, data, sig, code):
    out, steps, ckpt_every = tmp_path / "run", 60, 1000
    flags = ["--preset", "debug", "--data", str(data["train"]), "--out", str(out), "--threads", "1",
             "--steps", str(steps), "--ckpt-every", str(ckpt_every), "--log-every", "2", "--val-every", "0",
             "--image-every", "1000"]
    proc = subprocess.Popen(TRAIN + flags, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        lines = wait_for_lines(proc, 3)
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    last = err.strip().splitlines()[-1]
    step = checkpoint.load_raw(out)["step"]
    assert 6 <= step < steps and step % ckpt_every != 0  # saved at the interrupted step, not at an interval
    assert last == (f"[train] stopped by {sig.name} at step {step}: saved {out / 'ckpt.pt'}; continue with "
                    f"python -m worldmodel.train --out {out} --resume"), err
    # off a terminal the log is plain lines: no progress bar, no carriage returns
    log = "".join(lines) + rest
    assert "\r" not in log + err and "[train] step 6/60 | loss " in log and " frames/s" in log

    resumed = subprocess.run(TRAIN + ["--out", str(out), "--resume"], cwd=ROOT, env=ENV, capture_output=True,
                             text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step {step} to {steps}" in resumed.stdout
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["step"] == steps
    assert checkpoint.load_raw(out)["step"] == steps


# -- resume finishes the run as configured -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, data) -> Path:
    """A debug run of 4 steps (of the preset's 20) in a run folder, trained through the CLI's parser."""
    out = tmp_path_factory.mktemp("resume") / "run"
    argv = ["--preset", "debug", "--data", str(data["train"]), "--out", str(out), "--steps", "4", "--threads", "1",
            "--no-progress", "--val-every", "0", "--ckpt-every", "100", "--log-every", "2"]
    train(parse_args(argv), explicit=explicit_fields(argv))
    return out


CONFLICTS = [
    (["--lr", "0.01"], "--lr 0.01 conflicts with the run's saved lr 0.001 (RUN/config.json); to resume the run leave "
                       "that flag out"),
    (["--batch=8", "--seq-len", "5"], "--batch 8 conflicts with the run's saved batch 4, --seq-len 5 conflicts with "
                                      "the run's saved seq_len 8 (RUN/config.json)"),
    (["--memory", "none"], "--memory none conflicts with the run's saved memory introspective"),
    (["--preset", "mnist_cpu"], "--preset mnist_cpu conflicts with the run's saved preset debug"),
    (["--task", "perfect_recall"], "--task perfect_recall conflicts with the run's saved task (none)"),
    (["--memory-kwargs", '{"store_h": true}'], "--memory-kwargs {\"store_h\": true} conflicts with the run's saved "
                                               "memory_kwargs {}"),
    (["--steps", "3"], "--steps 3: the run in RUN has already done 4 steps; expected >= 4"),
    (["--data", "OTHER"], "--data OTHER (mnist_map, 6 episodes) is not the dataset of this run (TRAIN: mnist_map, "
                          "6 episodes; the episode checksums differ)"),
]


@pytest.mark.parametrize("flags,fragment", CONFLICTS, ids=[c[0][0].split("=")[0] for c in CONFLICTS])
def test_resume_refuses_a_flag_that_changes_the_run(stopped_run, data, capsys, flags, fragment):
    subst = {"RUN": str(stopped_run), "OTHER": str(data["other"]), "TRAIN": str(data["train"])}
    for key, value in subst.items():
        fragment = fragment.replace(key, value)
        flags = [f.replace(key, value) for f in flags]
    before = {name: digest(stopped_run / name) for name in ("ckpt.pt", "config.json")}
    code, out, err = run_main(["--out", str(stopped_run), "--resume", *flags], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert {name: digest(stopped_run / name) for name in before} == before  # nothing rewritten


def test_resume_keeps_the_saved_steps_and_applies_the_safe_flags(tmp_path, data, capsys):
    out = tmp_path / "run"
    argv = ["--preset", "debug", "--data", str(data["train"]), "--out", str(out), "--steps", "3", "--threads", "1",
            "--no-progress", "--val-every", "0", "--ckpt-every", "100"]
    assert run_main(argv, capsys)[0] == 0
    # no --steps: the run's own 3, not the default preset's 3,000 (and config.json is not rewritten to it)
    code, stdout, _ = run_main(["--out", str(out), "--resume"], capsys)
    assert code == 0 and "reached step 3 of 3: nothing to do" in stdout
    assert json.loads((out / "config.json").read_text())["steps"] == 3
    # the same values, spelled differently, are no conflict; the safe flags are applied and recorded
    code, stdout, err = run_main(["--out", str(out), "--resume", "--lr=0.001", "--batch", "4", "--preset", "debug",
                                  "--memory-kwargs", "{ }", "--steps", "5", "--log-every", "1", "--threads", "2",
                                  "--ckpt-every", "50"], capsys)
    assert code == 0, err
    saved = json.loads((out / "config.json").read_text())
    assert (saved["steps"], saved["log_every"], saved["threads"], saved["ckpt_every"]) == (5, 1, 2, 50)
    assert checkpoint.load_raw(out)["step"] == 5 and checkpoint.load_raw(out)["config"]["threads"] == 2
    assert "[train] step 4/5 | loss" in stdout  # --log-every 1 took effect

    # a moved copy of the same dataset may be named with --data; the moved-away original is then no longer needed
    moved = tmp_path / "moved"
    shutil.copytree(data["train"], moved, ignore=shutil.ignore_patterns(".cache", ".gtmm.lock"))
    code, _, err = run_main(["--out", str(out), "--resume", "--data", str(moved), "--steps", "6"], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["data"] == str(moved)
    moved.rename(tmp_path / "moved_again")
    code, _, err = run_main(["--out", str(out), "--resume", "--steps", "7"], capsys)
    assert code == 2 and f"the run's data folder {moved} is missing: if it moved, pass its new place with --data" in err


# -- validation during training ---------------------------------------------------------------------------------------

def read_val_log(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "val.jsonl").read_text().splitlines())}


def test_validation_logs_keeps_the_best_and_keeps_resume_exact(tmp_path, data, capsys):
    kw = dict(val_every=2, val_fraction=0.2, val_windows=4, ckpt_every=100, memory="introspective", address="actions")
    full = train(debug_config(tmp_path / "a", data["train"], steps=6, **kw))
    stdout = capsys.readouterr().out
    assert "[train] validation every 2 steps on 1 windows of 1 held-out episodes" in stdout
    assert "[train] step 4/6 | val loss " in stdout and "[train] step 6/6 | loss " in stdout

    log = read_val_log(tmp_path / "a")
    assert sorted(log) == [2, 4, 6]
    for record in log.values():
        assert all(np.isfinite(record[k]) for k in ("loss", "nll", "kl", "mse_open_loop"))
        assert record["loss"] == pytest.approx(record["nll"] + record["kl"]) and record["windows"] == 1
    best_step = min(log, key=lambda s: log[s]["loss"])
    best = checkpoint.load_raw(tmp_path / "a" / "best.pt")
    assert best["step"] == best_step and best["val"]["loss"] == pytest.approx(log[best_step]["loss"])
    assert [s for s in log if log[s]["best"]][-1] == best_step
    events = b"".join(p.read_bytes() for p in (tmp_path / "a" / "tb").glob("events.out.tfevents.*"))
    assert b"val/loss" in events and b"val/mse_revisit_context" in events

    # validating must not change what training draws: stop at 3, resume to 6, same losses and figures
    first = train(debug_config(tmp_path / "b", data["train"], steps=3, **kw))
    resumed = train(dataclasses.replace(debug_config(tmp_path / "b", data["train"], steps=6, **kw), resume=True))
    np.testing.assert_allclose([l for _, l in first["losses"] + resumed["losses"]], [l for _, l in full["losses"]],
                               rtol=1e-6)
    again = read_val_log(tmp_path / "b")
    assert sorted(again) == [2, 3, 4, 6]  # a run also validates its last step
    for step in (2, 4, 6):
        assert again[step]["loss"] == pytest.approx(log[step]["loss"], rel=1e-6)


def test_validation_is_skipped_with_a_note_when_the_data_has_no_val_split(tmp_path, data, capsys):
    result = train(debug_config(tmp_path, data["single"], steps=2, val_every=1, val_fraction=0.05))
    stdout = capsys.readouterr().out
    assert result["step"] == 2 and stdout.count("validation off") == 1
    assert "'val'" in next(line for line in stdout.splitlines() if "validation off" in line)
    assert not (tmp_path / "best.pt").exists()


def test_validation_on_a_sequence_task_uses_its_test_images(tmp_path, capsys):
    cfg = dataclasses.replace(preset("debug"), task="perfect_recall", out=str(tmp_path), steps=2, val_every=2,
                              val_windows=3, progress=False, threads=1)
    train(cfg)
    assert "validation every 2 steps on 3 sequences of perfect_recall on test images" in capsys.readouterr().out
    record = read_val_log(tmp_path)[2]
    assert np.isfinite(record["loss"]) and record["windows"] == 3
    assert checkpoint.load_raw(tmp_path / "best.pt")["val"]["windows"] == 3


def test_resume_refuses_data_that_changed_under_the_saved_path(tmp_path, data, capsys):
    folder = tmp_path / "data"
    shutil.copytree(data["other"], folder, ignore=shutil.ignore_patterns(".cache", ".gtmm.lock"))
    out = tmp_path / "run"
    argv = ["--preset", "debug", "--data", str(folder), "--out", str(out), "--steps", "2", "--threads", "1",
            "--no-progress", "--val-every", "0"]
    assert run_main(argv, capsys)[0] == 0
    shutil.rmtree(folder)
    shutil.copytree(data["train"], folder, ignore=shutil.ignore_patterns(".cache", ".gtmm.lock"))
    code, _, err = run_main(["--out", str(out), "--resume", "--steps", "3"], capsys)
    assert code == 2 and f"the run's data folder {folder} changed since the run started" in err, err
    assert checkpoint.load_raw(out)["step"] == 2


def test_one_validation_fraction_for_training_and_every_dataset_reader():
    import inspect as pyinspect

    from rollouts import dataset
    from worldmodel.config import TrainConfig

    assert TrainConfig().val_fraction == dataset.VAL_FRACTION
    for reader in (dataset.split_episodes, dataset.iter_episodes, dataset.RolloutWindows):
        assert pyinspect.signature(reader).parameters["val_fraction"].default == dataset.VAL_FRACTION


@pytest.mark.slow
def test_compiled_step_trains_and_the_switch_may_change_on_resume(data, tmp_path, capsys):
    """`--compile on` on the CPU (inductor) trains; `--compile off` is a safe change on resume."""
    out = tmp_path / "compiled"
    code, stdout, _ = run_main(["--preset", "debug", "--data", str(data["train"]), "--steps", "3", "--out", str(out),
                                "--compile", "on", "--no-progress", "--val-every", "0", "--threads", "1"], capsys)
    assert code == 0 and "compiling the recurrent step" in stdout
    assert checkpoint.load_raw(out)["step"] == 3 and json.loads((out / "config.json").read_text())["compile"] == "on"
    code, _, _ = run_main(["--out", str(out), "--resume", "--steps", "4", "--compile", "off", "--no-progress"], capsys)
    assert code == 0 and checkpoint.load_raw(out)["step"] == 4
    assert json.loads((out / "config.json").read_text())["compile"] == "off"


def test_threads_mean_the_same_in_every_command():
    """`--threads`: torch CPU threads, 0 = torch's default, 1 by default, in every command that has it."""
    from agents.train_sb3 import TrainSB3Config
    from rollouts.collect import CollectConfig
    from worldmodel.config import TrainConfig
    from worldmodel.dream import DreamConfig

    for config in (TrainConfig(), CollectConfig(), TrainSB3Config(), DreamConfig(checkpoint="c")):
        assert config.threads == 1, type(config).__name__


def test_resume_keeps_the_optimizer_state_when_a_later_version_added_a_parameter():
    """Adam's state is keyed by position over all parameters: a parameter added in a later version of a module (the
    lattice filter's evidence weight) would shift every later one. `optimizer_state_for` keeps each old parameter's
    moments on the right tensor and starts the new one fresh; with nothing new it returns the saved state."""
    from worldmodel.checkpoint import optimizer_state_for

    class Old(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))

    class New(Old):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Parameter(torch.zeros(()))  # registered last, like a new module parameter...
            self.d = torch.nn.Parameter(torch.ones(4))  # ...with an older one after it in a second group

    old = Old()
    old.d = torch.nn.Parameter(torch.ones(4))
    groups = lambda m: [{"params": [m.a, m.b]}, {"params": [p for p in (getattr(m, "c", None), m.d) if p is not None]}]  # noqa: E731
    opt = torch.optim.Adam(groups(old), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        (old.a.sum() * 2 + old.b.sum() * 3 + old.d.sum() * 5).backward()
        opt.step()
    new = New()
    new.load_state_dict(old.state_dict(), strict=False)
    new_opt = torch.optim.Adam(groups(new), lr=0.1)
    state, added = optimizer_state_for(new, new_opt, old.state_dict(), opt.state_dict())
    assert added == ["c"]
    new_opt.load_state_dict(state)
    for name in ("a", "b", "d"):
        assert torch.equal(new_opt.state[getattr(new, name)]["exp_avg"], opt.state[getattr(old, name)]["exp_avg"])
    assert new.c not in new_opt.state  # fresh
    new_opt.zero_grad()
    (new.a.sum() + new.c * 7 + new.d.sum()).backward()
    new_opt.step()  # and training goes on
    assert float(new_opt.state[new.c]["step"]) == 1 and float(new_opt.state[new.d]["step"]) == 3
    saved = opt.state_dict()
    same, none_added = optimizer_state_for(old, opt, old.state_dict(), saved)
    assert same is saved and none_added == []
