"""A researcher's first hour (issue 16): the defaults that work, end to end at tiny sizes.

- Envs declare what their actions do (``action_effects``, the contract in ``envs/__init__.py``), collect records it in
  the manifest, and ``worldmodel.train --address auto`` (the default) chooses the address from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs
from gtmm.cli import UserError
from worldmodel.path import displacement
from rollouts import storage
from rollouts.collect import CollectConfig, collect
from worldmodel import checkpoint
from worldmodel.config import ModelConfig, TrainConfig, auto_address, preset
from worldmodel.train import train


def tiny_folder(out: Path, **env_kwargs) -> Path:
    """A real collected MNIST-map folder: 4 loop walks of 9 steps on 2x2 maps."""
    collect(CollectConfig(env="mnist_map", agent="loop", episodes=4, steps=9, out=out, progress=False,
                          env_kwargs=json.dumps({"grid": 2, **env_kwargs})))
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_folder(tmp_path_factory.mktemp("data") / "wrap", border="wrap")


def debug(out: Path, **kw) -> TrainConfig:
    return dataclasses.replace(preset("debug"), out=str(out), progress=False, threads=1, val_every=0, **kw)


# -- envs declare their action effects ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"border": "wrap"}, {"border": "clip", "allow_stay": True}])
def test_mnist_map_action_effects_are_the_pose_changes(kwargs):
    env = gym.make("MnistMap-v0", **kwargs)
    effects = env.unwrapped.action_effects
    n = env.action_space.n
    assert effects["kind"] == "translate" and len(effects["moves"]) == n
    assert effects["exact"] == (kwargs["border"] == "wrap")
    assert effects == envs.make_vec("mnist_map", 2, **kwargs).action_effects  # the vector env declares the same
    side = env.unwrapped.map.shape[0]
    for action in range(n):
        _, info = env.reset(seed=3)
        before = info["pose"]
        after = env.step(action)[4]["pose"]
        change = after - before
        if kwargs["border"] == "wrap":
            change = (change + side // 2) % side - side // 2  # on the torus
            np.testing.assert_array_equal(change, effects["moves"][action])
        elif np.any(change):  # under clip a move into the border is blocked: otherwise it is exactly the move
            np.testing.assert_array_equal(change, effects["moves"][action])
    assert json.loads(json.dumps(effects)) == effects  # JSON-ready, as the manifest stores it


def test_miniworld_action_effects_are_the_pose_changes():
    env = envs.make("miniworld", obs_size=16, num_objects=0, turn_step=45.0, move_step=0.25)
    try:
        effects = env.unwrapped.action_effects
        assert effects["kind"] == "se2" and effects["exact"] is False
        assert effects["period"] == [None, None, pytest.approx(2 * math.pi)]  # the heading wraps; x and z do not
        _, info = env.reset(seed=0)
        headings = [info["pose"][2]]
        for _ in range(10):  # ten left turns of 45 degrees: the heading crosses the seam, the unwrapped path does not
            headings.append(env.step(0)[4]["pose"][2])
        assert all(-math.pi <= h < math.pi for h in headings)
        poses = torch.tensor([[[0.0, 0.0, h] for h in headings]], dtype=torch.float64)  # (1, 11, 3)
        turned = displacement(poses, effects["period"])[0, :, 2]
        np.testing.assert_allclose(turned.numpy(), np.radians(45.0) * np.arange(11), atol=1e-5)
        _, info = env.reset(seed=0)
        for action in (0, 1, 0, 2, 3):
            pose = info["pose"]
            _, _, _, _, info = env.step(action)
            turn, forward = effects["moves"][action]
            heading_change = (info["pose"][2] - pose[2] + math.pi) % (2 * math.pi) - math.pi
            assert heading_change == pytest.approx(turn, abs=1e-5)
            moved = info["pose"][:2] - pose[:2]
            if np.any(moved):  # not blocked by a wall: a step of `forward` metres along the heading (MiniWorld's axes)
                np.testing.assert_allclose(moved, forward * np.array([math.cos(pose[2]), -math.sin(pose[2])]),
                                           atol=1e-5)
    finally:
        env.close()


def test_registered_specs_have_a_time_limit_that_agrees_with_the_env():
    assert gym.spec("MnistMap-v0").max_episode_steps == 128
    assert gym.spec("MiniWorldRevisit-v0").max_episode_steps == 256
    env = gym.make("MnistMap-v0")
    env.reset(seed=0)
    ends = [t for t in range(1, 129) if env.step(0)[3]]
    assert ends == [128]  # the env and the TimeLimit truncate on the same step, once
    longer = envs.make("mnist_map", max_steps=200)  # max_steps alone decides through envs.make
    assert longer.spec.max_episode_steps == 200
    vec = gym.make_vec("MnistMap-v0", 2, vectorization_mode="vector_entry_point", max_steps=40)
    assert vec.unwrapped.max_steps == 40  # min(max_steps, the spec's 128), as a single env under TimeLimit


# -- collect records them, --address auto reads them -------------------------------------------------------------------

def test_collect_records_what_the_env_declares(folder):
    env = storage.read_manifest(folder)["env"]
    assert env["inverse_actions"] == [1, 0, 3, 2]
    assert env["action_effects"] == {"kind": "translate", "moves": [[-14, 0], [14, 0], [0, -14], [0, 14]],
                                     "exact": True, "period": [56, 56]}  # the default 2x2 map of 28-px digits
    assert storage.verify_folder(folder)["mismatches"] == []  # the episodes' stored identity includes them


def test_auto_address_on_a_collected_mnist_map_folder_is_recorded_resolved(folder, tmp_path, capsys):
    assert TrainConfig().address == "auto" and preset("mnist_cpu").address == "auto"
    result = train(debug(tmp_path / "run", data=str(folder), steps=2))
    expected = {"integrator": "additive", "inverse_actions": [1, 0, 3, 2]}
    assert "--address auto -> actions" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["address"] == "actions" and json.loads(saved["address_kwargs"]) == expected
    payload = checkpoint.load_raw(tmp_path / "run")
    assert payload["config"]["address"] == "actions" and payload["model_config"]["address"] == "actions"
    assert payload["model_config"]["address_kwargs"] == expected
    model, config = checkpoint.load(tmp_path / "run")
    assert model.cfg.address == "actions" and config.address == "actions"
    # resume sees the concrete address; `--address auto` given again is the same run, `--address hidden` is not
    resumed = train(dataclasses.replace(debug(tmp_path / "run", data=str(folder), steps=3), resume=True),
                    explicit={"address", "steps"})
    assert resumed["step"] == 3 and resumed["config"].address == "actions"
    with pytest.raises(UserError, match="--address hidden conflicts with the run's saved address actions"):
        train(dataclasses.replace(debug(tmp_path / "run", data=str(folder), steps=4, address="hidden"), resume=True),
              explicit={"address", "steps"})
    assert result["config"].address == "actions"


def test_explicit_address_and_kwargs_win(folder, tmp_path):
    hidden = train(debug(tmp_path / "hidden", data=str(folder), steps=1, address="hidden"))
    assert hidden["config"].address == "hidden" and hidden["config"].address_kwargs == "{}"
    merged = train(debug(tmp_path / "merged", data=str(folder), steps=1, address_kwargs='{"step_scale": 0.3}'))
    assert json.loads(merged["config"].address_kwargs) == {"integrator": "additive", "inverse_actions": [1, 0, 3, 2],
                                                           "step_scale": 0.3}
    with pytest.raises(UserError, match=r"--address-kwargs: unknown argument\(s\) \['speed'\] for address 'actions'"):
        train(debug(tmp_path / "bad", data=str(folder), steps=1, address_kwargs='{"speed": 2}'))
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_auto_address_for_a_task_is_hidden(tmp_path):
    result = train(debug(tmp_path / "task", task="perfect_recall", seq_len=6, steps=1))
    assert result["config"].address == "hidden"
    assert checkpoint.load_raw(tmp_path / "task")["model_config"]["address"] == "hidden"


def _model_of(env_entry, num_actions: int = 4):
    """The GTMM that auto builds for a manifest `env` entry (built for real: the kwargs must suit the class)."""
    from worldmodel.model import GTMM

    cfg, why = debug(Path("unused")).resolve_address(env_entry, num_actions)
    return GTMM(cfg.model_config((28, 28, 1), num_actions, 3)), why


def test_auto_address_on_a_miniworld_manifest_is_the_gated_se2_integrator():
    from envs.miniworld import INVERSE_ACTIONS, action_effects

    effects = action_effects(30.0, 0.4)
    env = {"name": "miniworld", "id": "MiniWorldRevisit-v0", "kwargs": {"max_steps": 64},
           "inverse_actions": list(INVERSE_ACTIONS), "action_effects": effects}
    model, why = _model_of(json.loads(json.dumps(env)))
    assert model.cfg.address == "actions" and model.cfg.address_kwargs == {
        "integrator": "se2", "moves": effects["moves"], "inverse_actions": [1, 0, 3, 2], "gate": True}
    assert model.cell.gate is not None and "SE(2)" in why and "blocked" in why
    # --address pose on the same data: the pose's heading is encoded periodically (se2), scales from the moves
    cfg, _ = dataclasses.replace(debug(Path("unused")), address="pose").resolve_address(env, 4)
    assert json.loads(cfg.address_kwargs) == {"se2": True, "pose_scale": 0.2, "heading_scale": effects["moves"][0][0] / 2}


def test_auto_address_on_a_clip_border_mnist_map_has_the_gate():
    from envs.mnist_map import action_effects

    effects = gym.make("MnistMap-v0").unwrapped.action_effects  # what a collect records today: the edges too
    assert effects == {"kind": "translate", "moves": [[-14, 0], [14, 0], [0, -14], [0, 14]], "exact": False,
                       "extent": [56, 56]}
    env = {"name": "mnist_map", "id": "MnistMap-v0", "kwargs": {}, "inverse_actions": [1, 0, 3, 2],
           "action_effects": effects}
    model, why = _model_of(env)
    assert model.cfg.address_kwargs == {"integrator": "lattice", "moves": effects["moves"], "extent": [56, 56],
                                        "gate": True, "place_evidence": True}
    assert model.cell.address.place_head is not None and "Bayes filter" in why
    # yours win: '{"gate": false}' is the plain integrator that assumes every move happens
    for older in (env, {**env, "action_effects": action_effects(14, 4, "clip")}):
        cfg, _ = dataclasses.replace(debug(Path("unused")), address_kwargs='{"gate": false}').resolve_address(older, 4)
        assert json.loads(cfg.address_kwargs) == {"integrator": "additive", "inverse_actions": [1, 0, 3, 2],
                                                  "gate": False}
    # a manifest from before the edges were declared: the additive integrator with the gate's wall features
    model, _ = _model_of({**env, "action_effects": action_effects(14, 4, "clip")})
    assert model.cfg.address_kwargs == {"integrator": "additive", "inverse_actions": [1, 0, 3, 2], "gate": True,
                                        "gate_walls": True}
    # a bad extent in a manifest (an untrusted file) is one clear line
    with pytest.raises(UserError, match=r"action_effects.extent"):
        _model_of({**env, "action_effects": {**effects, "extent": [56, "far"]}})


def test_auto_address_on_an_old_manifest_without_effects_is_the_gru_integrator():
    model, why = _model_of({"name": "mnist_map", "id": "MnistMap-v0", "kwargs": {"max_steps": 48}})
    assert model.cfg.address == "actions" and model.cfg.address_kwargs == {"integrator": "gru"}
    assert "declares no action effects" in why
    assert auto_address(None, 4, "none")[0] == "hidden"  # no memory reads an address
    assert auto_address(None, 0, "introspective")[0] == "hidden"  # no actions


@pytest.mark.parametrize("field, value, message", [
    ("inverse_actions", [1, 0, 3], "field 'env.inverse_actions' is [1, 0, 3], expected 4 action ids"),
    ("inverse_actions", [1, 2, 3, 0], "forming an involution"),
    ("action_effects", {"moves": []}, "field 'env.action_effects'"),
    ("action_effects", {"kind": "translate", "moves": [[1, 0]]}, "field 'env.action_effects.moves'"),
])
def test_a_bad_manifest_entry_is_named(field, value, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        auto_address({"name": "x", "id": "x", "kwargs": {}, field: value}, 4, "introspective")


def test_model_config_resolves_auto_without_a_manifest():
    cfg = ModelConfig()
    assert cfg.address == "hidden"  # a ModelConfig is always concrete
    assert TrainConfig().model_config((28, 28, 1), 4, 2).address == "actions"
    assert TrainConfig().model_config((28, 28, 1), 0, 0).address == "hidden"


# -- pretrained models: export, the registry, `pretrained:NAME` ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(folder, tmp_path_factory) -> Path:
    """A 3-step debug run on the collected folder, evaluated against itself (an eval.json to record)."""
    from worldmodel.evaluate import EvalConfig, run

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(debug(out, data=str(folder), steps=3, seq_len=8))
    run(EvalConfig(checkpoint=str(out), data=str(folder), context=3, windows=4, resamples=10, strip_windows=0,
                   device="cpu"))
    return out


def test_export_writes_a_small_weights_only_checkpoint_with_how_it_was_made(tiny_run, tmp_path):
    import torch

    from worldmodel import pretrained

    target = pretrained.export(pretrained.ExportConfig(run=str(tiny_run), name="tiny", out=str(tmp_path)))
    raw = torch.load(target, weights_only=True)  # plain tensors and values: nothing to unpickle but those
    assert "optimizer" not in raw and "rng" not in raw
    full = checkpoint.load_raw(tiny_run)
    assert target.stat().st_size < 0.6 * (tiny_run / "ckpt.pt").stat().st_size
    model, _ = checkpoint.load(target)
    reference, _ = checkpoint.load(tiny_run)
    params = {n for n, _ in reference.named_parameters()}
    for name, tensor in raw["model"].items():  # float16 parameters, buffers untouched (the Fourier frequencies)
        original = full["model"][name]
        if name in params and original.is_floating_point():
            assert tensor.dtype == torch.float16
            torch.testing.assert_close(model.state_dict()[name], original, atol=1e-3, rtol=1e-3)
        else:
            assert tensor.dtype == original.dtype and torch.equal(tensor, original), name
    made_by = raw["made_by"]
    assert made_by == json.loads(target.with_suffix(".json").read_text())
    assert made_by["steps"] == 3 and made_by["weights_dtype"] == "float16" and made_by["address"] == "actions"
    assert made_by["commands"][0].startswith("python -m rollouts.collect --env mnist_map --agent loop --episodes 4")
    assert "--preset debug --steps 3" in made_by["commands"][1] and "--val-every 0" in made_by["commands"][1]
    [figures] = made_by["eval"]
    assert figures["role"] == "model" and figures["open_loop_mse_revisit_context"]["mean"] > 0
    assert made_by["data"]["fingerprint"] == full["data_fingerprint"]
    with pytest.raises(UserError, match="exists: pass --overwrite"):
        pretrained.export(pretrained.ExportConfig(run=str(tiny_run), name="tiny", out=str(tmp_path)))
    with pytest.raises(UserError, match="--name 'Tiny-1'"):
        pretrained.export(pretrained.ExportConfig(run=str(tiny_run), name="Tiny-1", out=str(tmp_path)))


def test_unknown_pretrained_name_lists_the_shipped_ones():
    from worldmodel import pretrained

    with pytest.raises(UserError, match=r"checkpoint pretrained:nope: no such pretrained model; shipped: "):
        checkpoint.load("pretrained:nope")
    with pytest.raises(UserError, match="no such pretrained model"):
        checkpoint.resolve("pretrained:../../config")  # a name, never a path
    assert all(checkpoint.resolve(f"pretrained:{n}") == pretrained.path(n) for n in pretrained.names())


# -- the shipped models and the Python API ---------------------------------------------------------------------------

def _shipped(name: str) -> str:
    from worldmodel import pretrained

    if name not in pretrained.names():
        pytest.skip(f"pretrained:{name} is not shipped in {pretrained.ASSETS} (make it with python -m "
                    "worldmodel.pretrained export)")
    return f"pretrained:{name}"


def test_the_python_api_snippet_runs_as_documented():
    """The ```python block of worldmodel's docstring (the README's Python API section), run exactly as written."""
    import re
    import subprocess
    import sys

    import worldmodel

    _shipped("mnist_map")
    code = re.search(r"```python\n(.*?)```", worldmodel.__doc__, re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    mse = float(proc.stdout.rsplit(":", 1)[1])
    assert 0 <= mse < 0.05, proc.stdout  # the way back is recalled, not guessed (a 'none' model: ~0.1)


def test_import_worldmodel_stays_light():
    import subprocess
    import sys

    code = "import sys, worldmodel; print('torch' in sys.modules, callable(worldmodel.load))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]


def test_dream_from_recalls_better_with_memory_than_without():
    """The shipped memory model and its `none` baseline on the same held-out walks out and back."""
    import worldmodel

    memory, baseline = (worldmodel.load(_shipped(n)) for n in ("mnist_map", "mnist_map_none"))
    env = gym.make("MnistMap-v0", split="test", border="wrap")
    errors = {"memory": [], "none": []}
    for seed in range(8):
        obs, _ = env.reset(seed=seed)
        out = [int(a) for a in np.random.default_rng(seed).integers(0, 4, 7)]
        frames = [obs] + [env.step(a)[0] for a in out]
        back = [env.unwrapped.inverse_actions[a] for a in reversed(out)]
        truth = np.stack([env.step(a)[0] for a in back]) / 255.0
        for name, model in (("memory", memory), ("none", baseline)):
            dreamed = worldmodel.dream_from(model, np.stack(frames), out, back)
            assert dreamed.shape == truth.shape and dreamed.dtype == np.uint8
            errors[name].append(np.mean((dreamed / 255.0 - truth) ** 2))
    assert np.mean(errors["memory"]) < 0.5 * np.mean(errors["none"]), errors
    with pytest.raises(ValueError, match="6 actions for 8 context frames: expected K - 1 = 7"):
        worldmodel.dream_from(memory, np.stack(frames), out[:-1], back)


# -- validators: every registered env with its default kwargs ---------------------------------------------------------

def _registered(env_id: str) -> gym.Env:
    if env_id == "Dream-v0":  # needs a model: the shipped one, dreaming beside a live map
        return gym.make(env_id, checkpoint=_shipped("mnist_map"), env="mnist_map_test",
                        env_kwargs={"border": "wrap"}, device="cpu")
    return gym.make(env_id)


@pytest.mark.parametrize("env_id", ["MnistMap-v0", "MiniWorldRevisit-v0", "Dream-v0"])
def test_gymnasium_and_sb3_check_env(env_id):
    import warnings

    from gymnasium.utils.env_checker import check_env as gymnasium_check
    from stable_baselines3.common.env_checker import check_env as sb3_check

    env = _registered(env_id)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gymnasium_check(env.unwrapped, skip_render_check=True)
            sb3_check(env)
        # the only warning allowed: SB3's NatureCNN minimum of 36x36 (agents.sb3.policy_kwargs_for is the way round)
        others = [str(w.message) for w in caught if "minimal resolution for an image is 36x36" not in str(w.message)]
        assert others == []
    finally:
        env.close()


def test_sb3_cnn_policy_on_28x28_frames_with_our_features():
    from stable_baselines3 import PPO

    from agents.sb3 import policy_kwargs_for

    with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
        PPO("CnnPolicy", gym.make("MnistMap-v0"), device="cpu")  # SB3's NatureCNN: 36x36 at least
    model = PPO("CnnPolicy", gym.make("MnistMap-v0"), policy_kwargs=policy_kwargs_for(), n_steps=32, batch_size=32,
                n_epochs=1, device="cpu", seed=0)
    model.learn(32)


def test_minari_export_recovers_the_environment(folder, tmp_path, monkeypatch):
    import minari

    from rollouts.export import export_minari

    dataset = export_minari(folder, tmp_path / "minari")
    env = dataset.recover_environment()
    assert env.spec.id == "MnistMap-v0" and env.spec.kwargs == storage.read_manifest(folder)["env"]["kwargs"]
    assert env.spec.max_episode_steps == 9  # the recorded max_steps, not the spec's default 128
    first = next(iter(dataset.iterate_episodes()))
    [meta] = dataset.storage.get_episode_metadata([first.id])
    obs, _ = env.reset(seed=int(meta["seed"]))  # the recovered env with the episode's seed: the same first frame
    np.testing.assert_array_equal(obs, first.observations[0])
    assert dataset.recover_environment(eval_env=True).spec.kwargs == env.spec.kwargs
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    assert minari.load_dataset(dataset.spec.dataset_id).total_episodes == 4


def test_evaluate_a_shipped_model_names_it_and_writes_under_runs(tmp_path, monkeypatch):
    """`--checkpoint pretrained:NAME` is labelled by that name, its file is recorded, and the default output goes to
    runs/pretrained_NAME/eval/<data> in the working folder, never into the installed package."""
    import json

    from gtmm import cli
    from rollouts.collect import CollectConfig, collect
    from worldmodel import checkpoint, evaluate

    monkeypatch.chdir(tmp_path)
    collect(CollectConfig(env="mnist_map_test", agent="loop", episodes=4, steps=47, out=tmp_path / "held_out",
                          env_kwargs='{"border": "wrap"}', progress=False))
    with pytest.raises(SystemExit) as exit_:
        cli.run(evaluate.main, ["--checkpoint", "pretrained:mnist_map", "--baseline", "pretrained:mnist_map_none",
                                "--data", "held_out", "--windows", "4", "--resamples", "50", "--device", "cpu"])
    assert exit_.value.code == 0
    report = json.loads((tmp_path / "runs" / "pretrained_mnist_map" / "eval" / "held_out" / "eval.json").read_text())
    rows = {m["run"]: m for m in report["models"].values()}
    assert set(rows) == {"pretrained:mnist_map", "pretrained:mnist_map_none"}
    assert rows["pretrained:mnist_map"]["checkpoint"] == str(checkpoint.resolve("pretrained:mnist_map").resolve())
