"""Rollouts under faults, bad input and untrusted files (issue 10, the rollout side).

- every bad command line of collect / inspect / export: exit 2, ONE ``error:`` line naming the flag or file, no
  traceback, nothing written or overwritten (a table of real subprocesses);
- a manifest cannot make us open a file outside its folder, and its fields are type-checked;
- ``inspect --verify`` compares every file with the manifest (and the identity stored in the file) and lists every
  mismatch;
- two collects racing on one folder, a SIGKILLed collect's lock taken over, a full disk, the umask;
- MNIST-map parameters checked against the map, unknown env kwargs named;
- a dream collection refuses to resume with another checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import envs
from gtmm import cli
from gtmm.cli import UserError
from gtmm.fs import LOCK_NAME
from rollouts import storage
from rollouts.collect import CollectConfig, collect

REPO = Path(__file__).resolve().parents[1]


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included) -> sha256: what "nothing was written" compares."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def small_collect(out: Path, episodes: int = 3, steps: int = 8, **kwargs) -> dict:
    return collect(CollectConfig(env="mnist_map", agent="loop", episodes=episodes, steps=steps, out=out,
                                 progress=False, **kwargs))


def assert_one_error_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, stderr is exactly one ``error:`` line holding every needle, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# The table of bad command lines (item 11), run as real subprocesses, four at a time


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Folders and files the bad command lines point at."""
    base = tmp_path_factory.mktemp("world")
    paths = {"data": base / "data", "file": base / "a_file.txt", "empty": base / "empty", "badjson": base / "badjson",
             "notobj": base / "notobj", "escape": base / "escape", "badsha": base / "badsha",
             "foreign": base / "foreign", "minari": base / "minari", "new": base / "new"}
    small_collect(paths["data"])
    paths["file"].write_text("not a folder\n")
    paths["empty"].mkdir()
    for name, text in (("badjson", "{bad"), ("notobj", "[1, 2]")):
        paths[name].mkdir()
        (paths[name] / storage.MANIFEST_NAME).write_text(text)
    for name, field, value in (("escape", "file", "../data/episode_000001.npz"), ("badsha", "sha256", "xyz")):
        shutil.copytree(paths["data"], paths[name])
        manifest = json.loads((paths[name] / storage.MANIFEST_NAME).read_text())
        manifest["episodes"][1][field] = value
        (paths[name] / storage.MANIFEST_NAME).write_text(json.dumps(manifest))
    paths["foreign"].mkdir()
    paths["new"].mkdir()  # each case's "{new}" is its own subfolder (cases run at once), which must not appear
    (paths["foreign"] / "notes.txt").write_text("mine")
    if _has_minari():
        from rollouts.export import export_minari

        export_minari(paths["data"], paths["minari"], "test/d-v0")
    else:
        paths["minari"].mkdir()
    return paths


def _has_minari() -> bool:
    try:
        import minari  # noqa: F401
    except ImportError:
        return False
    return True


COLLECT = "rollouts.collect"
INSPECT = "rollouts.inspect"
EXPORT = "rollouts.export"
TINY = ["--episodes", "2", "--steps", "4", "--no-progress"]

# (id, module, argv with {placeholders} from `world`, substrings the one error line must hold)
BAD_INPUTS = [
    ("collect-seed-negative", COLLECT, ["--out", "{new}/c", "--seed", "-1", *TINY], ["--seed -1", ">= 0"]),
    ("collect-episodes-0", COLLECT, ["--out", "{new}/c", "--steps", "4", "--episodes", "0"], ["--episodes 0"]),
    ("collect-steps-0", COLLECT, ["--out", "{new}/c", "--episodes", "2", "--steps", "0"], ["--episode-steps 0"]),
    ("collect-episode-steps-0", COLLECT, ["--out", "{new}/c", "--episodes", "2", "--episode-steps", "0"],
     ["--episode-steps 0"]),
    ("collect-workers-0", COLLECT, ["--out", "{new}/c", "--workers", "0", *TINY], ["--workers 0"]),
    ("collect-threads-negative", COLLECT, ["--out", "{new}/c", "--threads=-1", *TINY], ["--threads -1"]),
    ("collect-episodes-not-int", COLLECT, ["--out", "{new}/c", "--episodes", "abc"], ["--episodes"]),
    ("collect-unknown-flag", COLLECT, ["--out", "{new}/c", "--epsiodes", "3"], ["--epsiodes"]),
    ("collect-out-is-file", COLLECT, ["--out", "{file}", *TINY], ["--out", "a_file.txt", "is a file"]),
    ("collect-sb3-no-policy", COLLECT, ["--out", "{new}/c", "--agent", "sb3", *TINY], ["--policy"]),
    ("collect-sb3-policy-missing", COLLECT, ["--out", "{new}/c", "--agent", "sb3", "--policy", "{new}/p.zip", *TINY],
     ["--policy", "p.zip", "not found"]),
    ("collect-policy-without-sb3", COLLECT, ["--out", "{new}/c", "--policy", "{file}", *TINY], ["--policy"]),
    ("collect-env-kwargs-bad-json", COLLECT, ["--out", "{new}/c", "--env-kwargs", "{grid: 4", *TINY],
     ["--env-kwargs", "not valid JSON"]),
    ("collect-env-kwargs-not-object", COLLECT, ["--out", "{new}/c", "--env-kwargs", "[4]", *TINY],
     ["--env-kwargs", "JSON object"]),
    ("collect-agent-kwargs-bad-json", COLLECT, ["--out", "{new}/c", "--agent-kwargs", "{", *TINY], ["--agent-kwargs"]),
    ("collect-env-kwargs-unknown", COLLECT, ["--out", "{new}/c", "--env-kwargs", '{"nope": 1}', *TINY],
     ["--env-kwargs", "'nope'", "grid", "step", "window"]),
    ("collect-env-kwargs-grid-bool", COLLECT, ["--out", "{new}/c", "--env-kwargs", '{"grid": true}', *TINY],
     ["grid", "bool"]),
    ("collect-env-kwargs-step-beyond-map", COLLECT, ["--out", "{new}/c", "--env-kwargs", '{"step": 100}', *TINY],
     ["step 100"]),
    ("collect-env-unknown", COLLECT, ["--out", "{new}/c", "--env", "nope", *TINY], ["--env", "'nope'"]),
    ("collect-agent-unknown", COLLECT, ["--out", "{new}/c", "--agent", "nope", *TINY], ["--agent", "'nope'"]),
    ("collect-dream-no-checkpoint", COLLECT, ["--out", "{new}/c", "--env", "dream", *TINY], ["'checkpoint'"]),
    ("collect-dream-checkpoint-missing", COLLECT,
     ["--out", "{new}/c", "--env", "dream", "--env-kwargs", '{"checkpoint": "{new}/run"}', *TINY],
     ["checkpoint", "run", "no such file"]),
    ("collect-into-other-seed", COLLECT, ["--out", "{data}", "--agent", "loop", "--seed", "5", "--episodes", "3",
                                          "--steps", "8", "--no-progress"], ["seed", "another --out"]),
    ("collect-into-foreign-folder", COLLECT, ["--out", "{foreign}", *TINY], ["--out", "foreign", "not empty"]),
    ("collect-manifest-escapes", COLLECT, ["--out", "{escape}", "--agent", "loop", "--episodes", "3", "--steps", "8",
                                           "--no-progress"], ["escape/manifest.json", "../data/episode_000001.npz"]),
    ("inspect-no-manifest", INSPECT, ["{empty}"], ["empty/manifest.json", "missing"]),
    ("inspect-no-such-folder", INSPECT, ["{new}/nothing"], ["nothing", "does not exist"]),
    ("inspect-invalid-json", INSPECT, ["{badjson}"], ["badjson/manifest.json", "not valid JSON"]),
    ("inspect-manifest-not-object", INSPECT, ["{notobj}"], ["notobj/manifest.json", "JSON object"]),
    ("inspect-a-file", INSPECT, ["{file}"], ["a_file.txt", "is a file"]),
    ("inspect-scale-0", INSPECT, ["{data}", "--scale", "0"], ["--scale 0"]),
    ("inspect-fps-0", INSPECT, ["{data}", "--fps", "0"], ["--fps"]),
    ("inspect-episode-absent", INSPECT, ["{data}", "--episode", "99"], ["--episode 99"]),
    ("inspect-gif-over-manifest", INSPECT, ["{data}", "--gif", "{data}/manifest.json"], ["--gif", ".gif"]),
    ("inspect-gif-folder-missing", INSPECT, ["{data}", "--gif", "{new}/no/x.gif"], ["--gif", "does not exist"]),
    ("inspect-manifest-escapes", INSPECT, ["{escape}"], ["escape/manifest.json", "'../data/episode_000001.npz'"]),
    ("inspect-manifest-bad-sha", INSPECT, ["{badsha}"], ["badsha/manifest.json", "episodes[1].sha256", "'xyz'"]),
    ("export-no-format", EXPORT, ["--data", "{data}", "--out", "{new}/m"], ["--minari"]),
    ("export-out-is-file", EXPORT, ["--minari", "--data", "{data}", "--out", "{file}"], ["--out", "a_file.txt"]),
    ("export-data-is-file", EXPORT, ["--minari", "--data", "{file}", "--out", "{new}/m"], ["a_file.txt", "is a file"]),
    ("export-data-no-manifest", EXPORT, ["--minari", "--data", "{empty}", "--out", "{new}/m"], ["empty/manifest.json"]),
    ("export-bad-dataset-id", EXPORT, ["--minari", "--data", "{data}", "--out", "{new}/m", "--dataset-id", "no id"],
     ["--dataset-id", "'no id'"]),
    ("export-dataset-id-escapes", EXPORT, ["--minari", "--data", "{data}", "--out", "{new}/m", "--dataset-id",
                                           "ab/../../x-v0"], ["--dataset-id"]),
    ("export-dataset-id-short-namespace", EXPORT, ["--minari", "--data", "{data}", "--out", "{new}/m", "--dataset-id",
                                                   "t/x-v0"], ["--dataset-id"]),
    ("export-manifest-escapes", EXPORT, ["--minari", "--data", "{escape}", "--out", "{new}/m"],
     ["escape/manifest.json", "../data"]),
]
EXISTING_DATASET = ("export-into-existing-dataset", EXPORT,
                    ["--minari", "--data", "{data}", "--out", "{minari}", "--dataset-id", "test/d-v0"],
                    ["test/d-v0", "already exists", "--overwrite"])


def fill(text: str, world: dict[str, Path], case_id: str = "") -> str:
    """``text`` with each ``{name}`` of ``world`` replaced by its path (JSON braces left alone); ``{new}`` is a path
    of its own per case, so cases running at once never share a folder that one of them creates."""
    text = text.replace("{new}", str(world["new"] / case_id))
    for name, path in world.items():
        text = text.replace("{" + name + "}", str(path))
    return text


def _run(module: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300, **kwargs)


@pytest.fixture(scope="module")
def bad_input_results(world) -> dict[str, subprocess.CompletedProcess]:
    """Run the whole table (four processes at a time: most of each run is Python starting), checking that it
    leaves every file of `world` as it was and creates nothing."""
    cases = BAD_INPUTS + ([EXISTING_DATASET] if _has_minari() else [])
    before = tree_digest(world["data"].parent)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = {case_id: pool.submit(_run, module, [fill(a, world, case_id) for a in argv])
                   for case_id, module, argv, _ in cases}
        results = {case_id: future.result() for case_id, future in futures.items()}
    assert tree_digest(world["data"].parent) == before, "a bad command line changed or created a file"
    assert not any(world["new"].iterdir()), "a bad command line created its output folder"
    return results


@pytest.mark.parametrize("case_id, module, argv, needles", BAD_INPUTS + [EXISTING_DATASET],
                         ids=[case[0] for case in BAD_INPUTS + [EXISTING_DATASET]])
def test_bad_input_is_one_error_line(bad_input_results, world, case_id, module, argv, needles):
    if case_id not in bad_input_results:
        pytest.skip("minari is not installed")
    assert_one_error_line(bad_input_results[case_id], *[fill(n, world, case_id) for n in needles])


def test_inspect_writes_nothing_without_gif(world, tmp_path):
    """Issue 16: inspecting a folder used to drop a preview GIF into it; now only --gif writes one."""
    before = tree_digest(world["data"])
    result = _run(INSPECT, [str(world["data"])])
    assert result.returncode == 0, result.stderr
    assert "verified 3 episode files" in result.stdout
    assert tree_digest(world["data"]) == before
    result = _run(INSPECT, [str(world["data"]), "--episode", "2", "--gif", str(tmp_path / "e.gif")])
    assert result.returncode == 0 and (tmp_path / "e.gif").stat().st_size > 0, result.stderr
    assert tree_digest(world["data"]) == before


# ---------------------------------------------------------------------------------------------------------------------
# Item 3: every file a manifest names stays inside its folder; every field is type-checked


def edit_manifest(root: Path, edit) -> None:
    """Apply ``edit(manifest)`` to the raw JSON (no validation, counts untouched): what a hand edit does."""
    manifest = json.loads((root / storage.MANIFEST_NAME).read_text())
    edit(manifest)
    (root / storage.MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.fixture
def data(world, tmp_path) -> Path:
    """A fresh copy of the 3-episode folder to tamper with."""
    root = tmp_path / "d"
    shutil.copytree(world["data"], root)
    return root


@pytest.mark.parametrize("file, problem", [
    ("../outside/episode_000001.npz", "goes up out of the folder"),
    ("/etc/episode_000001.npz", "is an absolute path"),
    ("sub/episode_000001.npz", "is not an episode file name"),
    ("episode_1.npz", "is not an episode file name"),
    ("manifest.json", "is not an episode file name"),
    (7, "is of type int, expected a file name string"),
])
def test_manifest_file_outside_the_folder_is_refused_everywhere(data, file, problem):
    from rollouts.dataset import RolloutWindows, iter_episodes

    edit_manifest(data, lambda m: m["episodes"][1].update(file=file))
    where = f"{data / storage.MANIFEST_NAME}: field 'episodes[1].file' {file!r} {problem}"
    for use in (lambda: storage.read_manifest(data), lambda: list(iter_episodes(data)),
                lambda: RolloutWindows(data, 3, split="all", cache=False), lambda: storage.verify_folder(data),
                lambda: small_collect(data)):
        with pytest.raises(UserError) as error:
            use()
        assert str(error.value).startswith(where), str(error.value)
    record = {"index": 1, "file": file}
    with pytest.raises(UserError, match=f"episode 1 file .* {problem}"):
        storage.episode_path(data, record)


def test_symlinks_out_of_the_folder_and_special_files_are_refused(data, tmp_path):
    from rollouts.dataset import iter_episodes

    target = data / storage.episode_filename(1)
    outside = tmp_path / "outside.npz"
    shutil.copyfile(target, outside)  # the same bytes: the checksum alone would let it through
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(UserError, match=rf"episode 1 file 'episode_000001.npz' is a symlink to {outside}, outside"):
        list(iter_episodes(data))
    with pytest.raises(UserError, match="outside the folder"):
        small_collect(data)
    report = storage.verify_folder(data)
    assert report["verified"] == 2 and len(report["mismatches"]) == 1 and "symlink" in report["mismatches"][0]
    # a symlink that stays inside the folder is fine
    target.unlink()
    shutil.copyfile(outside, data / ".copy.npz")
    target.symlink_to(".copy.npz")
    assert len(list(iter_episodes(data))) == 3
    # a FIFO in place of an episode would block a reader forever: refused without opening it
    target.unlink()
    os.mkfifo(target)
    with pytest.raises(UserError, match="episode_000001.npz' is not a regular file"):
        list(iter_episodes(data))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["episodes"][0].update(index="0"), "'episodes[0].index' is '0', expected an integer >= 0"),
    (lambda m: m["episodes"][0].update(index=True), "'episodes[0].index' is True"),
    (lambda m: m["episodes"][0].update(steps=-1), "'episodes[0].steps' is -1"),
    (lambda m: m["episodes"][0].update(sha256="ABC"), "'episodes[0].sha256' is 'ABC', expected 64 lowercase hex"),
    (lambda m: m["episodes"][0].pop("sha256"), "'episodes[0].sha256' is None"),
    (lambda m: m["episodes"][0].update(terminated="no"), "'episodes[0].terminated' is 'no', expected true or false"),
    (lambda m: m["episodes"][0].update(revisit_frames=100), "'episodes[0].revisit_frames' is 100, expected at most"),
    (lambda m: m["episodes"][0].update(env_seed=-3), "'episodes[0].env_seed' is -3"),
    (lambda m: m["episodes"][0].update(index=1), "episodes[0] and episodes[1] both have index 1"),
    (lambda m: m["episodes"][2].update(file="episode_000000.npz"), "episodes[0] and episodes[2] both name file"),
    (lambda m: m.update(episodes={}), "'episodes' is {}, expected a list"),
    (lambda m: m.update(obs_shape=[28, 28]), "'obs_shape' is [28, 28], expected [H, W, C]"),
    (lambda m: m.update(num_actions=0), "'num_actions' is 0, expected an integer >= 1"),
    (lambda m: m.update(seed=None), "'seed' is None"),
    (lambda m: m.pop("env"), "'env' is None, expected an object"),
    (lambda m: m["env"].update(kwargs=[]), "'env.kwargs' is [], expected an object"),
    (lambda m: m.update(format_version=3), "'format_version' is 3, expected one of [1, 2]"),
])
def test_manifest_fields_are_type_checked(data, edit, message):
    edit_manifest(data, edit)
    with pytest.raises(UserError, match=str(data / storage.MANIFEST_NAME)) as error:
        storage.read_manifest(data)
    assert message in str(error.value)


# ---------------------------------------------------------------------------------------------------------------------
# Item 8: inspect --verify checks every file against the manifest and the identity stored inside it


def rewrite(root: Path, edit) -> None:
    """Edit the manifest and rewrite it as collect would (counts consistent): a careful tampering."""
    manifest = storage.read_manifest(root)
    edit(manifest)
    storage.write_manifest(root, manifest)


def swap_in_file_of_episode_2(manifest):
    """Entry 1 points at episode 2's file with that file's sha256 and size; entry 2 is dropped."""
    other = manifest["episodes"][2]
    manifest["episodes"][1].update(file=other["file"], sha256=other["sha256"], bytes=other["bytes"])
    del manifest["episodes"][2]


@pytest.mark.parametrize("edit, expected, count", [
    (lambda m: m["episodes"][1].update(steps=9), "episode 1 (episode_000001.npz): steps: the manifest says 9, the file has 8", 1),
    (lambda m: m["episodes"][1].update(revisit_frames=m["episodes"][1]["revisit_frames"] - 1), "revisit_frames: the manifest says", 1),
    (lambda m: m["episodes"][1].update(terminated=True), "terminated: the manifest says True, the file has False", 1),
    (lambda m: m["episodes"][1].update(**{"return": 5.0}), "return: the manifest says 5.0, the file has 0.0", 1),
    (lambda m: m["env"].update(name="mnist_map_test"), "env (stored in the file): the manifest says {'name': 'mnist_map_test'", 3),
    (lambda m: m["env"].update(id="MnistMap-v1"), "env (stored in the file)", 3),
    (lambda m: m["env"]["kwargs"].update(grid=4), "env (stored in the file)", 3),
    (lambda m: m["agent"].update(name="random"), "agent (stored in the file)", 3),
    (lambda m: m.update(seed=5), "seed (stored in the file): the manifest says 5, the file has 0", 3),
    (lambda m: m["episodes"][0].update(env_seed=1), "episode 0 (episode_000000.npz): env_seed (stored in the file)", 1),
    (swap_in_file_of_episode_2, "episode 1 (episode_000002.npz): index (stored in the file): the manifest says 1, the file has 2", 1),
    (lambda m: m.update(obs_shape=[28, 28, 3]), "obs_shape: the manifest says [28, 28, 3], the file has [28, 28, 1]", 3),
    (lambda m: m.update(pose_dim=3), "pose_dim: the manifest says 3, the file has 2", 3),
    (lambda m: m.update(num_actions=1), "actions span [", 3),
    (lambda m: m.update(steps_per_episode=4), "steps: 8 is more than the folder's steps_per_episode 4", 3),
])
def test_verify_catches_every_tampering(data, edit, expected, count):
    assert storage.verify_folder(data) == {"verified": 3, "mismatches": [], "notes": []}
    rewrite(data, edit)
    report = storage.verify_folder(data)
    hits = [m for m in report["mismatches"] if expected in m]
    assert len(hits) == count, report["mismatches"]


def test_verify_reads_the_files_not_the_manifest(world, data, tmp_path):
    """Damaged, missing, grown and identity-less files, and counts that do not add up, are all reported at once."""
    from rollouts.dataset import RolloutWindows

    (data / storage.episode_filename(0)).unlink()
    with open(data / storage.episode_filename(1), "ab") as f:
        f.write(b"\0")  # a zip still readable, but not the file the manifest describes
    episode = storage.load_episode(data / storage.episode_filename(2))
    episode.pop(storage.IDENTITY_KEY)
    sha = storage.save_episode(data / storage.episode_filename(2), episode)  # same arrays, no identity
    rewrite(data, lambda m: m["episodes"][2].update(sha256=sha, bytes=(data / m["episodes"][2]["file"]).stat().st_size))
    edit_manifest(data, lambda m: m["counts"].update(steps=1000))
    report = storage.verify_folder(data)
    text = "\n".join(report["mismatches"])
    assert report["verified"] == 0 and len(report["mismatches"]) == 5, text
    assert "manifest counts" in text and "episode 0 (episode_000000.npz): the file is missing" in text
    assert "episode 1 (episode_000001.npz): bytes: the manifest says" in text and "episode 1 (episode_000001.npz): sha256" in text
    assert "episode 2 (episode_000002.npz): the file stores no 'identity'" in text
    # the loaders are as strict: with episode 2's file (and sha256) under episode 1's name, training refuses it
    swapped = tmp_path / "swapped"
    shutil.copytree(world["data"], swapped)
    shutil.copyfile(swapped / storage.episode_filename(2), swapped / storage.episode_filename(1))
    rewrite(swapped, lambda m: m["episodes"][1].update(sha256=m["episodes"][2]["sha256"], bytes=m["episodes"][2]["bytes"]))
    with pytest.raises(UserError, match="episode_000001.npz does not match its manifest entry .*index \\(stored in the file\\)"):
        RolloutWindows(swapped, 3, split="all", cache=False)


def test_inspect_lists_every_mismatch_then_fails(data):
    rewrite(data, lambda m: (m["episodes"][0].update(steps=7), m["episodes"][2].update(terminated=True)))
    result = _run(INSPECT, [str(data)])
    assert_one_error_line(result, str(data), "2 mismatches", "1 of 3 files match")
    listed = [line for line in result.stdout.splitlines() if line.startswith("mismatch: ")]
    assert len(listed) == 2 and "episode 0" in listed[0] and "episode 2" in listed[1], result.stdout


def test_format_1_folders_are_read_and_resumed_as_format_1(world, tmp_path):
    """A folder written before identities existed: read, verified without identity (with a note), and a resumed
    collect adds episodes without identity so the folder stays one format."""
    old = tmp_path / "old"
    old.mkdir()
    manifest = storage.read_manifest(world["data"])
    manifest.update(format_version=1, episodes=[])
    for index in (0, 1):
        episode = storage.load_episode(world["data"] / storage.episode_filename(index))
        episode.pop(storage.IDENTITY_KEY)
        file = storage.episode_filename(index)
        sha = storage.save_episode(old / file, episode)
        record = storage.read_manifest(world["data"])["episodes"][index]
        manifest["episodes"].append({**record, "sha256": sha, "bytes": (old / file).stat().st_size})
    storage.write_manifest(old, manifest)
    report = storage.verify_folder(old)
    assert report["verified"] == 2 and not report["mismatches"] and "format version 1" in report["notes"][0]
    small_collect(old)  # the same command as `world["data"]`: resumes with episode 2
    resumed = storage.read_manifest(old)
    assert resumed["format_version"] == 1 and len(resumed["episodes"]) == 3
    new = storage.load_episode(old / storage.episode_filename(2))
    assert storage.IDENTITY_KEY not in new
    reference = storage.load_episode(world["data"] / storage.episode_filename(2))
    for key in storage.EPISODE_KEYS:
        assert np.array_equal(new[key], reference[key]), key
    assert not storage.verify_folder(old)["mismatches"]


# ---------------------------------------------------------------------------------------------------------------------
# Item 4: one writer per folder; a killed writer's lock is taken over


def collect_argv(out: Path, episodes: int, steps: int) -> list[str]:
    return [sys.executable, "-m", "rollouts.collect", "--env", "mnist_map", "--agent", "loop", "--episodes",
            str(episodes), "--steps", str(steps), "--seed", "3", "--out", str(out), "--no-progress"]


def wait_for_files(folder: Path, count: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while len(list(folder.glob("episode_*.npz"))) < count:
        assert process.poll() is None, "the collect ended before writing the episodes waited for"
        assert time.time() < deadline, "timed out waiting for episodes"
        time.sleep(0.005)


def test_two_collects_racing_on_one_folder(tmp_path):
    out = tmp_path / "d"
    first = subprocess.Popen(collect_argv(out, 5000, 16), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for_files(out, 2, first)
        second = subprocess.run(collect_argv(out, 5000, 16), cwd=REPO, capture_output=True, text=True, timeout=120)
        assert_one_error_line(second, str(out), "in use by another process", f"pid {first.pid}")
        assert first.poll() is None, "the first collect must still be running: the refusal was the lock's"
    finally:
        first.kill()
        first.wait()
    report = storage.verify_folder(out)  # the survivor's folder is whole: every listed file matches
    assert report["verified"] >= 1 and not report["mismatches"], report


def test_killed_collect_lock_is_taken_over_and_resume_is_identical(tmp_path):
    episodes, steps = 100, 16
    full, killed = tmp_path / "full", tmp_path / "killed"
    collect(CollectConfig(env="mnist_map", agent="loop", episodes=episodes, steps=steps, seed=3, out=full,
                          progress=False))
    process = subprocess.Popen(collect_argv(killed, episodes, steps), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for_files(killed, 5, process)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert (killed / LOCK_NAME).exists(), "a SIGKILLed holder leaves its lock file (the kernel drops the lock)"
    assert len(list(killed.glob("episode_*.npz"))) < episodes
    report = storage.verify_folder(killed)  # whole, and the lock file is nobody's stray file
    assert not report["mismatches"] and not any(LOCK_NAME in note for note in report["notes"]), report
    result = subprocess.run(collect_argv(killed, episodes, steps), cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert tree_digest(killed) == tree_digest(full), "the resumed folder is the uninterrupted one, lock file gone"
    # a folder holding nothing but a dead holder's lock file is still an empty folder to collect
    lone = tmp_path / "lone"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from gtmm.fs import FolderLock; "
                               "FolderLock(sys.argv[1], 'collect').acquire(); print('locked', flush=True); "
                               "time.sleep(60)", str(lone)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    assert [p.name for p in lone.iterdir()] == [LOCK_NAME]
    small_collect(lone)
    assert sorted(p.name for p in lone.iterdir()) == [*(storage.episode_filename(i) for i in range(3)), "manifest.json"]


def test_export_waits_for_no_one(world, tmp_path):
    """An export into a folder another process holds is refused with one line; nothing is written."""
    pytest.importorskip("minari")
    out = tmp_path / "m"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from gtmm.fs import FolderLock; "
                               "FolderLock(sys.argv[1], 'collect').acquire(); print('locked', flush=True); "
                               "time.sleep(60)", str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = _run(EXPORT, ["--minari", "--data", str(world["data"]), "--out", str(out), "--dataset-id", "test/x-v0"])
        assert_one_error_line(result, str(out), "in use by another process")
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: the export runs, and --overwrite replaces a dataset only once the new one is complete
    from rollouts.export import export_minari

    assert export_minari(world["data"], out, "test/x-v0").total_episodes == 3
    assert export_minari(world["data"], out, "test/x-v0", overwrite=True).total_episodes == 3
    assert sorted(p.name for p in out.iterdir()) == ["test"] and sorted(p.name for p in (out / "test").iterdir()) == [
        "namespace_metadata.json", "x-v0"]


# ---------------------------------------------------------------------------------------------------------------------
# Item 7: a full disk during collect


def test_disk_full_during_collect_is_one_line_and_resumable(tmp_path, monkeypatch, capsys):
    """The OS reports ENOSPC on the 5th fsync (after two episodes and their manifests): one error line naming the
    file, no temp file, a manifest whose every entry verifies, and the same command then finishes the folder."""
    from rollouts.collect import main

    out = tmp_path / "d"
    argv = ["--env", "mnist_map", "--agent", "loop", "--episodes", "6", "--steps", "8", "--out", str(out),
            "--no-progress"]
    real_fsync, calls = os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) >= 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(SystemExit) as exit_:
        cli.run(main, argv)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: no space left on device while writing {out}/"), err
    assert not list(out.glob(".*.tmp")), "the temp file of the failed write is removed"
    report = storage.verify_folder(out)
    assert not report["mismatches"] and report["verified"] >= 1, report
    small_collect(tmp_path / "full", episodes=6)
    with pytest.raises(SystemExit) as exit_:
        cli.run(main, argv)
    assert exit_.value.code == 0
    assert tree_digest(out) == tree_digest(tmp_path / "full")


def test_manifest_is_rewritten_a_bounded_number_of_times_and_interrupts_list_every_episode(tmp_path, monkeypatch):
    """A long collection rewrites its manifest O(log n) times, not once per wave (that was quadratic), and a Ctrl-C
    between rewrites still leaves a manifest that lists every episode file written."""
    writes = []
    real_write = storage.write_manifest
    monkeypatch.setattr(storage, "write_manifest", lambda out, m: (writes.append(len(m["episodes"])),
                                                                  real_write(out, m)))
    out = tmp_path / "d"
    small_collect(out, episodes=400, steps=2)
    assert len(storage.read_manifest(out)["episodes"]) == 400 and writes[-1] == 400
    # every wave up to 64 episodes, then each time 1/64 more are new: 64 + 64 ln(400 / 64) ~ 180 writes, not 400
    assert len(writes) <= 200, f"{len(writes)} manifest writes for 400 one-episode waves"

    real_save, saves = storage.save_episode, []

    def save_then_interrupt(*args, **kwargs):
        if len(saves) == 300:  # like Ctrl-C while episode 300 runs: 300 episodes on disk, some not yet listed
            raise KeyboardInterrupt
        saves.append(args[0])
        return real_save(*args, **kwargs)

    monkeypatch.setattr(storage, "save_episode", save_then_interrupt)
    writes.clear()
    interrupted = tmp_path / "i"
    with pytest.raises(KeyboardInterrupt):
        small_collect(interrupted, episodes=400, steps=2)
    assert writes[-2] < 300 and writes[-1] == 300, "the last write before the interrupt listed fewer"
    report = storage.verify_folder(interrupted)
    assert report["verified"] == 300 and not report["mismatches"], report
    monkeypatch.setattr(storage, "save_episode", real_save)
    small_collect(interrupted, episodes=400, steps=2)
    assert tree_digest(interrupted) == tree_digest(out)


def _can_mount_tmpfs(where: Path) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True)
    except OSError:
        return False
    return done.returncode == 0


def test_disk_full_on_a_real_small_tmpfs(tmp_path):
    """The same on a real full filesystem (needs root to mount a tmpfs; skipped elsewhere)."""
    mount = tmp_path / "small"
    if not _can_mount_tmpfs(mount):
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        out = mount / "d"
        argv = collect_argv(out, 40, 32)
        result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert_one_error_line(result, "no space left on device while writing", str(out))
        assert not list(out.glob(".*.tmp"))
        report = storage.verify_folder(out)
        assert not report["mismatches"] and 0 < report["verified"] < 40, report
        subprocess.run(["mount", "-o", "remount,size=4m", str(mount)], check=True)
        result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        full = tmp_path / "full"
        subprocess.run(collect_argv(full, 40, 32), cwd=REPO, check=True, capture_output=True)
        assert tree_digest(out) == tree_digest(full)
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


# ---------------------------------------------------------------------------------------------------------------------
# Item 12: files respect the umask


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_files_respect_the_umask(tmp_path, umask, mode):
    out = tmp_path / "d"
    subprocess.run(collect_argv(out, 2, 4), cwd=REPO, check=True, capture_output=True, umask=umask)
    for path in [*out.glob("episode_*.npz"), out / storage.MANIFEST_NAME]:
        assert stat.S_IMODE(path.stat().st_mode) == mode, (path.name, oct(path.stat().st_mode))


# ---------------------------------------------------------------------------------------------------------------------
# Item 10: env parameters checked against the map, unknown kwargs named


@pytest.mark.parametrize("kwargs, message", [
    ({"grid": True}, "grid must be an int, got True (bool)"),
    ({"grid": 2.0}, "grid must be an int, got 2.0 (float)"),
    ({"step": "14"}, "step must be an int"),
    ({"step": 57}, "step 57 is larger than the 56 px the window 28 can travel"),
    ({"step": 200}, "step 200 is larger than the 56 px"),
    ({"grid": 1}, "window 28 fills the map 28x28"),
    ({"border": "wrap", "step": 84}, "step 84 is a whole side of the map 84x84"),
    ({"border": "wrap", "step": 50}, "it lands where 34 px the other way would"),
    ({"border": 3}, "unknown border mode 3"),
    ({"max_steps": True}, "max_steps must be an int >= 1, got True"),
    ({"max_steps": 0}, "max_steps must be an int >= 1"),
    ({"allow_stay": "no"}, "allow_stay must be true or false"),
    ({"split": "val"}, "unknown split 'val'"),
    ({"source": 3}, "source must be a string"),
])
def test_mnist_map_parameters_are_checked_against_the_map(kwargs, message):
    for make in (lambda: envs.make("mnist_map", **kwargs), lambda: envs.make_vec("mnist_map", 2, **kwargs)):
        with pytest.raises(UserError) as error:
            make()
        assert message in str(error.value)


def test_largest_steps_that_still_move_are_accepted():
    for kwargs in ({"step": 56}, {"border": "wrap", "step": 42}):
        env = envs.make("mnist_map", **kwargs)
        _, info = env.reset(seed=0)
        poses = {tuple(info["pose"])} | {tuple(env.step(a)[4]["pose"]) for a in (0, 1, 2, 3)}
        assert len(poses) > 1, kwargs


def test_unknown_and_missing_env_kwargs_are_named():
    with pytest.raises(UserError, match=r"env 'mnist_map' \(MnistMap-v0\) has no argument 'nope'; it accepts "
                                        r"allow_stay, border, grid, max_steps, render_mode, source, split, step, task, window"):
        envs.make("mnist_map", nope=1)
    with pytest.raises(UserError, match="has no arguments 'a', 'b'"):
        envs.make_vec("mnist_map", 2, a=1, b=2)
    with pytest.raises(UserError, match=r"env 'dream' \(Dream-v0\) needs the argument 'checkpoint'"):
        envs.make("dream")
    with pytest.raises(UserError, match=r"env 'miniworld' \(MiniWorldRevisit-v0\) has no argument 'grid'.*room_size"):
        envs.make("miniworld", grid=3)  # checked before any OpenGL is touched


def test_stock_miniworld_kwargs_are_named():
    import gymnasium as gym

    from envs.miniworld import import_miniworld

    try:
        import_miniworld()  # headless, as the env itself does it
    except gym.error.DependencyNotInstalled as error:
        pytest.skip(str(error))
    with pytest.raises(UserError, match=r"MiniWorld-Hallway-v0: no argument 'nope'; it accepts .*length"):
        envs.make("miniworld:Hallway", nope=1)


# ---------------------------------------------------------------------------------------------------------------------
# Item 9: one dream folder, one model


@pytest.mark.slow
def test_dream_collection_refuses_another_checkpoint(tmp_path):
    import dataclasses

    import torch

    from worldmodel.config import preset
    from worldmodel.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        small_collect(tmp_path / "data", episodes=4, steps=12)
        train(dataclasses.replace(preset("debug"), data=str(tmp_path / "data"), steps=1, out=str(tmp_path / "run"),
                                  progress=False, threads=1))
        kwargs = json.dumps({"checkpoint": str(tmp_path / "run"), "data": str(tmp_path / "data"), "device": "cpu"})
        config = CollectConfig(env="dream", agent="random", episodes=2, steps=5, out=tmp_path / "dream",
                               progress=False, env_kwargs=kwargs)
        collect(config)
        sha = storage.sha256_file(tmp_path / "run" / "ckpt.pt")
        manifest = storage.read_manifest(tmp_path / "dream")
        assert manifest["env"]["checkpoint_sha256"] == sha
        assert not storage.verify_folder(tmp_path / "dream")["mismatches"]
        before = tree_digest(tmp_path / "dream")
        # another model at the same path: refused before it is even loaded, naming both checksums
        (tmp_path / "run" / "ckpt.pt").write_bytes(b"another model")
        other = hashlib.sha256(b"another model").hexdigest()
        with pytest.raises(UserError, match=f"checkpoint sha256 {sha} but {tmp_path / 'run'} now has sha256 {other}"):
            collect(dataclasses.replace(config, episodes=3))
        assert tree_digest(tmp_path / "dream") == before
    finally:
        torch.set_num_threads(threads)
