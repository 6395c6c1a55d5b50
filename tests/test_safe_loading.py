"""Loading a file never executes code (issue 10, items 1, 2 and 7): checkpoints and SB3 policy zips.

Every crafted file here is first shown to be malicious (the unsafe loader it targets runs its payload and the marker
file appears), then loaded through our code and the real CLIs: the marker must never appear, and the refusal is one
`error:` line naming the file with exit code 2.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import hashlib
import io
import json
import os
import pickle
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gtmm.cli import UserError
from worldmodel import checkpoint
from worldmodel.config import preset
from worldmodel.model import GTMM

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


class Payload:
    """Pickles as a call of `func(*args)`: what a crafted file's `__reduce__` runs when it is unpickled."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker: Path) -> dict[str, Payload]:
    return {"os.system": Payload(os.system, f"touch {marker}"), "open": Payload(open, str(marker), "w")}


def tiny_model_and_config():
    cfg = dataclasses.replace(preset("debug"), out="runs/tiny")
    torch.manual_seed(0)
    return GTMM(cfg.model_config((28, 28, 1), 4, 0)), cfg


def write_evil_checkpoint(path: Path, payload: Payload) -> Path:
    """A real torch zip archive (torch.save) holding a checkpoint-shaped dict whose model field runs `payload`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"version": checkpoint.FORMAT_VERSION, "model": payload, "model_config": {}, "config": {},
                "step": 1}, path)
    return path


def assert_one_line_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def run_module(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=240)


# -- checkpoints ---------------------------------------------------------------------------------------------------------

def test_round_trip_restores_weights_optimizer_and_rng_exactly(tmp_path):
    model, cfg = tiny_model_and_config()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sum(p.sum() for p in model.parameters()).backward()
    optimizer.step()  # an optimizer state with tensors and step counts
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # cached gaussians are part of the state too
    path = checkpoint.save(tmp_path / "run" / "ckpt.pt", model=model, optimizer=optimizer, config=cfg, step=5)
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())

    torch.load(path, weights_only=True)  # what we claim: plain torch can read it with the safe loader
    payload = checkpoint.load_raw(tmp_path / "run")
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(payload["rng"])
    again = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    assert again == expected
    assert payload["step"] == 5 and payload["version"] == checkpoint.FORMAT_VERSION
    for name, tensor in model.state_dict().items():
        assert torch.equal(payload["model"][name], tensor), name
    restored = torch.optim.Adam(model.parameters(), lr=1e-3)
    restored.load_state_dict(payload["optimizer"])
    for a, b in zip(optimizer.state.values(), restored.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    loaded, loaded_cfg = checkpoint.load(path)
    assert loaded_cfg == cfg and loaded.cfg == model.cfg


def test_resolve_and_sha256(tmp_path):
    model, cfg = tiny_model_and_config()
    path = checkpoint.save(tmp_path / "run" / "ckpt.pt", model=model, optimizer=None, config=cfg, step=1)
    assert checkpoint.resolve(tmp_path / "run") == path and checkpoint.resolve(path) == path
    assert checkpoint.sha256_of(tmp_path / "run") == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(UserError, match="no such file"):
        checkpoint.resolve(tmp_path / "nothing")
    with pytest.raises(UserError, match="no such file"):
        checkpoint.sha256_of(tmp_path)  # a folder without ckpt.pt


@pytest.mark.parametrize("kind", ["os.system", "open"])
def test_crafted_checkpoint_is_refused_without_running(tmp_path, kind):
    marker = tmp_path / "MARKER"
    evil = write_evil_checkpoint(tmp_path / "evil" / "ckpt.pt", payloads(marker)[kind])
    torch.load(evil, weights_only=False)  # the file is truly malicious: the unsafe loader runs it
    assert marker.exists()
    marker.unlink()
    for load in (checkpoint.load, checkpoint.load_raw):
        with pytest.raises(UserError, match="not loadable safely") as error:
            load(tmp_path / "evil")
        assert str(evil) in str(error.value) and "\n" not in str(error.value)
        assert not marker.exists()


def test_format_1_checkpoint_is_refused_with_a_hint(tmp_path):
    """Checkpoints of format 1 pickled numpy RNG state (and were loaded with weights_only=False)."""
    model, cfg = tiny_model_and_config()
    old = tmp_path / "old.pt"
    torch.save({"version": 1, "model": model.state_dict(), "model_config": dataclasses.asdict(model.cfg),
                "config": dataclasses.asdict(cfg), "step": 1,
                "rng": {"python": random.getstate(), "numpy": np.random.get_state()}}, old)
    with pytest.raises(UserError, match="not loadable safely.*numpy.*format 1"):
        checkpoint.load_raw(old)
    # a format-1 layout that happens to be plain still names its version
    torch.save({"version": 1, "model": {}, "model_config": {}, "config": {}, "step": 1}, old)
    with pytest.raises(UserError, match="format version 1, this gtmm reads version 2"):
        checkpoint.load_raw(old)


def garbage_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"empty": b"", "random": np.random.default_rng(0).bytes(4096), "text": b"hello, not a checkpoint\n"}
    out = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        out[name] = folder / name
    with zipfile.ZipFile(folder / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "a zip, not a checkpoint")
    out["zip"] = folder / "other.zip"
    truncated = io.BytesIO()
    torch.save({"version": checkpoint.FORMAT_VERSION, "model": {"w": torch.zeros(1000)}}, truncated)
    (folder / "truncated").write_bytes(truncated.getvalue()[:-300])
    out["truncated"] = folder / "truncated"
    torch.save(torch.zeros(3), folder / "tensor")
    out["tensor"] = folder / "tensor"
    torch.save({"version": checkpoint.FORMAT_VERSION, "model": {"w": 1}, "model_config": {}, "config": {},
                "step": 1}, folder / "fields")
    out["fields"] = folder / "fields"
    return out


def test_garbage_files_give_one_user_error_naming_the_file(tmp_path):
    expected = {"empty": "file is empty", "random": "not a torch zip archive", "text": "not a torch zip archive",
                "zip": "without data.pkl", "truncated": "not a gtmm checkpoint", "tensor": "not a gtmm checkpoint",
                "fields": "not a state dict of tensors"}
    for name, path in garbage_files(tmp_path).items():
        with pytest.raises(UserError) as error:
            checkpoint.load(path)
        message = str(error.value)
        assert str(path) in message and expected[name] in message and "\n" not in message, (name, message)


@pytest.mark.slow
def test_crafted_checkpoint_through_the_clis(tmp_path):
    """evaluate (--checkpoint and --baseline), dream, train --resume and collect --env dream refuse it: exit 2, one
    line naming the file, no marker."""
    marker = tmp_path / "MARKER"
    evil = write_evil_checkpoint(tmp_path / "evil" / "ckpt.pt", payloads(marker)["os.system"])
    model, cfg = tiny_model_and_config()
    good = checkpoint.save(tmp_path / "good" / "ckpt.pt", model=model, optimizer=None, config=cfg, step=1)
    from rollouts.collect import CollectConfig, collect

    data = str(tmp_path / "data")  # a real dataset, so that evaluate gets as far as reading the checkpoints
    collect(CollectConfig(env="mnist_map", episodes=1, steps=9, out=Path(data), progress=False))
    commands = [
        ("worldmodel.evaluate", "--checkpoint", str(tmp_path / "evil"), "--data", data, "--out", str(tmp_path / "e1")),
        ("worldmodel.evaluate", "--checkpoint", str(good), "--baseline", str(evil), "--data", data,
         "--out", str(tmp_path / "e2")),
        ("worldmodel.dream", "--checkpoint", str(evil), "--env", "mnist_map", "--agent", "random",
         "--out", str(tmp_path / "d.gif")),
        ("worldmodel.train", "--out", str(tmp_path / "evil"), "--resume", "--preset", "debug", "--no-progress"),
        ("rollouts.collect", "--env", "dream", "--env-kwargs", json.dumps({"checkpoint": str(evil), "env": "mnist_map"}),
         "--out", str(tmp_path / "dreamed"), "--episodes", "1", "--steps", "4", "--no-progress"),
    ]
    before = evil.read_bytes()
    # the commands run at once: each spends most of its time importing torch
    running = [subprocess.Popen([sys.executable, "-m", *command], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for command in commands]
    for command, popen in zip(commands, running):
        stdout, stderr = popen.communicate(timeout=240)
        proc = subprocess.CompletedProcess(popen.args, popen.returncode, stdout, stderr)
        line = assert_one_line_error(proc, str(evil))
        assert "not loadable safely" in line and "posix.system" in line, line
        assert not marker.exists(), command
    assert evil.read_bytes() == before  # refused, not overwritten
    assert not (tmp_path / "d.gif").exists() and not any((tmp_path / "dreamed").rglob("*.npz"))


# -- a full disk ---------------------------------------------------------------------------------------------------------

def saved_pair(folder: Path) -> tuple[Path, bytes, GTMM, object]:
    model, cfg = tiny_model_and_config()
    path = checkpoint.save(folder / "ckpt.pt", model=model, optimizer=None, config=cfg, step=1)
    return path, path.read_bytes(), model, cfg


def assert_disk_full_refusal(path: Path, old: bytes, model, cfg) -> None:
    optimizer = torch.optim.Adam(model.parameters())  # a bigger checkpoint than the old one
    sum(p.sum() for p in model.parameters()).backward()
    optimizer.step()
    with pytest.raises(UserError, match=f"no space left on device while writing {path}"):
        checkpoint.save(path, model=model, optimizer=optimizer, config=cfg, step=2)
    assert path.read_bytes() == old
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]  # no .ckpt.pt.*.tmp left
    assert checkpoint.load_raw(path)["step"] == 1


def test_disk_full_keeps_the_old_checkpoint_and_no_temp(tmp_path, monkeypatch):
    """The OS says ENOSPC on write (mocked at the os.fdopen file object gtmm.fs writes through)."""
    path, old, model, cfg = saved_pair(tmp_path / "run")
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, *args, **kwargs: FullDisk(real_fdopen(fd, *args, **kwargs)))
    assert_disk_full_refusal(path, old, model, cfg)


def test_disk_full_on_a_real_tiny_tmpfs(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    probe_path, old, model, cfg = saved_pair(tmp_path / "probe")
    size = (len(old) * 3 // 2 // 4096 + 1) * 4096  # room for the old checkpoint, not for a second, bigger one
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (the mocked ENOSPC test covers this)")
    try:
        path = mount / "ckpt.pt"
        path.write_bytes(old)
        assert_disk_full_refusal(path, old, model, cfg)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# -- SB3 policy zips -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ppo(tmp_path_factory):
    """An untrained PPO with our CNN, saved both ways: our loadable zip and plain SB3's zip."""
    import envs
    from stable_baselines3 import PPO

    from agents.sb3 import policy_kwargs_for, save_policy

    folder = tmp_path_factory.mktemp("policies")
    env = envs.make("mnist_map", max_steps=16)
    model = PPO("CnnPolicy", env, n_steps=16, batch_size=16, seed=0, device="cpu", policy_kwargs=policy_kwargs_for())
    save_policy(model, folder / "ours.zip")
    model.save(folder / "plain.zip")
    return {"ours": folder / "ours.zip", "plain": folder / "plain.zip", "action_space": env.action_space}


def with_serialized_payload(source: Path, dest: Path, payload: Payload) -> Path:
    """`source` with its data JSON's policy_class replaced by a `:serialized:` cloudpickle payload (SB3's format)."""
    with zipfile.ZipFile(source) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    data = json.loads(entries["data"])
    data["policy_class"][":serialized:"] = base64.b64encode(pickle.dumps(payload)).decode()
    entries["data"] = json.dumps(data).encode()
    with zipfile.ZipFile(dest, "w") as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    return dest


def replace_entry(source: Path, dest: Path, name: str, content: bytes) -> Path:
    with zipfile.ZipFile(source) as archive:
        entries = {n: archive.read(n) for n in archive.namelist()}
    entries[name] = content
    with zipfile.ZipFile(dest, "w") as archive:
        for n, c in entries.items():
            archive.writestr(n, c)
    return dest


def test_sb3_zip_with_a_serialized_payload_is_refused(tmp_path, ppo):
    from stable_baselines3 import PPO

    from agents.sb3 import SB3Agent

    marker = tmp_path / "MARKER"
    evil = with_serialized_payload(ppo["plain"], tmp_path / "evil.zip", payloads(marker)["open"])
    with pytest.raises(Exception):
        PPO.load(evil, device="cpu")  # SB3's loader runs the payload (then fails on what it returned)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UserError, match="python -m agents.train_sb3") as error:
        SB3Agent(ppo["action_space"], policy=str(evil))
    assert str(evil) in str(error.value) and "gtmm_policy.json" in str(error.value)
    assert not marker.exists()

    out = tmp_path / "data"
    proc = run_module("rollouts.collect", "--env", "mnist_map", "--agent", "sb3", "--policy", str(evil), "--out",
                      str(out), "--episodes", "1", "--steps", "4", "--no-progress", cwd=tmp_path)
    assert_one_line_error(proc, str(evil))
    assert not marker.exists()
    assert not out.exists() or not any(out.rglob("*.npz"))


def test_our_zip_ignores_serialized_fields(tmp_path, ppo):
    """A policy from agents.train_sb3 is rebuilt from gtmm_policy.json: a payload in its data JSON is never read."""
    from agents.sb3 import SB3Agent

    marker = tmp_path / "MARKER"
    evil = with_serialized_payload(ppo["ours"], tmp_path / "evil.zip", payloads(marker)["os.system"])
    agent = SB3Agent(ppo["action_space"], policy=str(evil))
    reference = SB3Agent(ppo["action_space"], policy=str(ppo["ours"]))
    obs = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28, 1), dtype=np.uint8)
    for a in (agent, reference):
        a.reset(3, seed=7)
    assert np.array_equal(agent.act(obs, {}), reference.act(obs, {}))
    assert not marker.exists()


def test_sb3_zip_with_unsafe_weights_or_classes_is_refused(tmp_path, ppo):
    from agents.sb3 import SPEC_NAME, SB3Agent

    marker = tmp_path / "MARKER"
    pth = io.BytesIO()
    torch.save({"weight": payloads(marker)["open"]}, pth)
    bad_weights = replace_entry(ppo["ours"], tmp_path / "weights.zip", "policy.pth", pth.getvalue())
    with zipfile.ZipFile(ppo["ours"]) as archive:
        spec = json.loads(archive.read(SPEC_NAME))
    spec["policy_kwargs"]["features_extractor_class"] = {"class": "posix.system"}
    bad_class = replace_entry(ppo["ours"], tmp_path / "class.zip", SPEC_NAME, json.dumps(spec).encode())
    (tmp_path / "text.zip").write_text("not a zip")
    cases = {bad_weights: "not loadable safely", bad_class: "'posix.system' is not one of the known classes",
             tmp_path / "text.zip": "not a policy zip"}
    for path, reason in cases.items():
        with pytest.raises(UserError, match=reason) as error:
            SB3Agent(ppo["action_space"], policy=str(path))
        assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert not marker.exists()
