"""Issue 14's construction changes for the paper's sequence tasks, and the benchmark that measures them.

- content addressing (every slot memory's ``content_address``): a slot is found by what was written there;
- it keeps the fast path equal to the step-by-step reference;
- ``benchmarks/paper_tasks.py``: where the reads went at recall steps (found vs chance), seeds, result reuse, errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from worldmodel.memory import build_memory
from worldmodel.model import GTMM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import paper_tasks  # noqa: E402
from test_fast_path import (  # noqa: E402
    assert_close_grads, assert_same_state, both_paths, elbo_loss, grads, random_inputs, tiny_config,
)

SLOT_MEMORIES = ("introspective", "ntm", "lru", "dnc")
Z = A = 6  # latent and address sizes of the hand-built memories: W_c can be the identity


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one torch thread (conftest's fixture)."""


def write_latents(memory, latents: torch.Tensor, addr: torch.Tensor) -> dict:
    """Write latents (B, S, Z) at addresses (B, S, A) step by step into an empty memory; the state after."""
    B, S = latents.shape[:2]
    h = torch.zeros(B, memory.h_dim)
    state = memory.init_state(B)
    for s in range(S):
        state = memory.write(state, h, addr[:, s], latents[:, s])
    return state


@pytest.mark.parametrize("name", SLOT_MEMORIES)
def test_content_address_finds_a_slot_by_what_was_written_there(name: str) -> None:
    # Every step written at the SAME address (a hidden address cannot tell action-free steps apart by place):
    # address-only reads see identical slots and spread evenly; with content addressing a key equal to one step's
    # latent finds that step's slot.
    torch.manual_seed(0)
    S = 4
    latents = torch.eye(Z)[:S].unsqueeze(0) * 3.0  # (1, S, Z) orthogonal latents
    addr = torch.ones(1, S, A)  # (1, S, A)
    found = {}
    for content_address in (False, True):
        memory = build_memory(name, z_dim=Z, h_dim=8, addr_dim=A, slots=S + 2, heads=1,
                              content_address=content_address)
        if content_address:
            assert torch.count_nonzero(memory.content_address.weight) == 0  # starts as the address-only memory
            with torch.no_grad():
                memory.content_address.weight.copy_(4.0 * torch.eye(A, Z))  # slot address = 1 + 4 z_s
        with torch.no_grad():
            memory.keys.from_addr.weight.copy_(torch.eye(A))  # key = the address given to the read
        state = write_latents(memory, latents, addr)
        target = 2
        key_addr = torch.ones(1, A) + 4.0 * latents[:, target]  # the address content addressing stored for step 2
        out = memory.attend(state, torch.zeros(1, 8), key_addr)
        read = out["read"][0, :Z] / out["gate"][0, 0]  # (Z,) the ungated read
        found[content_address] = read @ latents[0, target] / latents[0, target].norm() ** 2  # 1.0: exactly step 2
    assert found[True] > 0.8, found  # the DNC mixes 9% of its temporal-link reads in
    assert found[False] < 0.5, found


@pytest.mark.parametrize("name", SLOT_MEMORIES)
def test_content_keys_find_a_slot_by_its_latent_and_leave_address_reads_alone(name: str) -> None:
    # As above, every step at the same address: a content key along one step's latent finds that step's slot;
    # at zero (its initial value) the read is the address-only memory's, to the last bit.
    torch.manual_seed(0)
    S, H = 4, 8
    latents = torch.eye(Z)[:S].unsqueeze(0) * 3.0  # (1, S, Z) orthogonal latents
    addr = torch.ones(1, S, A)  # (1, S, A)
    torch.manual_seed(1)
    plain = build_memory(name, z_dim=Z, h_dim=H, addr_dim=A, slots=S + 2, heads=1)
    torch.manual_seed(1)
    memory = build_memory(name, z_dim=Z, h_dim=H, addr_dim=A, slots=S + 2, heads=1, content_keys=True)
    assert torch.count_nonzero(memory.content_keys.from_h.weight) == 0
    memory.load_state_dict(plain.state_dict(), strict=False)
    h = torch.zeros(1, H)
    h[0, 0] = 1.0
    reads = [m.attend(write_latents(m, latents, addr), h, torch.ones(1, A)) for m in (plain, memory)]
    torch.testing.assert_close(reads[1]["weights"], reads[0]["weights"])
    target = 2
    with torch.no_grad():
        memory.content_keys.from_h.weight[:, 0] = 20.0 * latents[0, target] / 3.0  # c = 20 * unit latent of step 2
    out = memory.attend(write_latents(memory, latents, addr), h, torch.ones(1, A))
    read = out["read"][0, :Z] / out["gate"][0, 0]  # (Z,) the ungated read
    found = read @ latents[0, target] / latents[0, target].norm() ** 2
    assert found > 0.8, found  # the DNC mixes some temporal-link reads in


OPTIONS = [("introspective", {"content_address": True}), ("introspective", {"content_address": True, "store_h": True}),
           ("ntm", {"content_address": True}), ("lru", {"content_address": True}), ("dnc", {"content_address": True}),
           ("introspective", {"content_keys": True}), ("ntm", {"content_keys": True}), ("lru", {"content_keys": True}),
           ("dnc", {"content_keys": True})]


@pytest.mark.parametrize("address", ["hidden", "pose"])
@pytest.mark.parametrize("memory, kwargs", OPTIONS, ids=[f"{m}-{'+'.join(k)}" for m, k in OPTIONS])
def test_fast_path_matches_the_reference_with_the_new_options(memory: str, kwargs: dict, address: str) -> None:
    """The writes (and the FIFO's precomputed similarities, off with content addresses) give the reference's
    losses, states and gradients. W_c is moved off zero first, so that it matters."""
    torch.manual_seed(0)
    model = GTMM(tiny_config(memory, address, memory_kwargs=kwargs))
    with torch.no_grad():
        for layer in (model.cell.memory.content_address, model.cell.memory.content_keys):
            if layer is not None:
                (layer.from_h if hasattr(layer, "from_h") else layer).weight.normal_(0.0, 0.5)
    inputs = random_inputs(model.cfg)
    ref, fast = both_paths(model, inputs)
    for key in ("nll", "kl", "z", "read"):
        torch.testing.assert_close(fast[key], ref[key], rtol=1e-4, atol=1e-4, msg=key)
    assert_same_state(ref["state"], fast["state"], memory)
    assert_close_grads(model, grads(model, elbo_loss(ref)), grads(model, elbo_loss(fast)))


# -- the benchmark ---------------------------------------------------------------------------------------------------


def test_image_identity_follows_copies_of_copies() -> None:
    recall_of = np.array([[-1, -1, 0, -1, 2, 3]])  # 2 copies 0, 4 copies the copy at 2, 5 copies 3
    assert paper_tasks.image_identity(recall_of).tolist() == [[0, 1, 0, 3, 0, 3]]


def fifo_reads(recall_of: np.ndarray, N: int, right: bool) -> dict:
    """A FIFO's per-step diagnostics whose one head reads, at every recall step, the slot holding the source
    (right=True) or the newest slot (right=False, never the source here)."""
    B, T = recall_of.shape
    weights = torch.zeros(B, T, 1, N)
    for b in range(B):
        for t in range(T):
            source = recall_of[b, t]
            # the read of step t sees M_{t-1}: slot n holds step t - N + n
            weights[b, t, 0, source - t + N if right and source >= 0 else N - 1] = 1.0
    return {"read_weights": weights, "read_gate": torch.ones(B, T, 1)}


def test_recall_retrieval_tells_a_found_frame_from_a_missed_one() -> None:
    memory = build_memory("introspective", z_dim=Z, h_dim=8, addr_dim=A, slots=8, heads=1)
    recall_of = np.array([[-1, -1, -1, 0, 1, 2, -1, 3]])  # T = 8: 3..5 repeat 0..2, 7 repeats the copy at 3
    found = paper_tasks.recall_retrieval(memory, fifo_reads(recall_of, 8, right=True), recall_of)
    missed = paper_tasks.recall_retrieval(memory, fifo_reads(recall_of, 8, right=False), recall_of)
    assert len(found["found"]) == 4  # every recall step (memory holds all 8 steps)
    np.testing.assert_allclose(found["found"], 1.0)
    np.testing.assert_allclose(missed["found"], 0.0)
    # chance: a uniform read over the filled slots (3, 4, 5 then 7 filled; 7 has two right slots: 0 and 3)
    np.testing.assert_allclose(found["chance"], [1 / 3, 1 / 4, 1 / 5, 2 / 7])
    assert paper_tasks.recall_retrieval(build_memory("none", z_dim=Z, h_dim=8, addr_dim=A), {}, recall_of) == {}


TINY = ["--steps", "2", "--batch", "2", "--eval-sequences", "4", "--z-dim", "4", "--h-dim", "8", "--embed-dim", "8",
        "--channels", "4", "--hidden-dim", "8", "--addr-dim", "4", "--heads", "1", "--jobs", "2", "--seq-len", "7"]


@pytest.mark.slow
def test_benchmark_runs_seeds_tabulates_and_reuses_finished_runs(tmp_path: Path, capfd) -> None:
    # --seq-len 7: perfect recall fits 6 frames, which the trainer saves; the run is still the one asked for
    out = tmp_path / "runs"
    argv = TINY + ["--tasks", "perfect_recall", "--memories", "none", "introspective", "--seeds", "0", "1",
                   "--out", str(out), "--table", str(tmp_path / "table.md")]
    results = paper_tasks.main(argv)
    assert [(r["memory"], r["seed"]) for r in results] == [("none", 0), ("none", 1), ("introspective", 0),
                                                           ("introspective", 1)]
    assert all("error" not in r for r in results), [r.get("traceback") for r in results]
    intro = results[2]
    assert 0.0 <= intro["read_chance"] <= 1.0 and 0.0 <= intro["read_found"] <= 1.0
    assert "read_found" not in results[0]  # `none` reads nothing
    saved = json.loads((out / "perfect_recall" / "introspective" / "seed1" / "config.json").read_text())
    assert json.loads(saved["memory_kwargs"]) == {"content_keys": True} and saved["seed"] == 1
    assert saved["write_latent"] == "mean" and saved["prior_skip"] and saved["prior_outlier"] == 0.01
    assert json.loads((out / "perfect_recall" / "none" / "seed0" / "config.json").read_text())["memory_kwargs"] == "{}"
    table = (tmp_path / "table.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| perfect_recall")]
    # two steps leave the model encoding < 1 nat a frame: the table says so rather than showing a ratio
    assert len(rows) == 2 and all("| 0/2 |" in row and "seed 1: untrained" in row for row in rows), rows
    # a second call reuses the finished runs (same results, no training) ...
    again = paper_tasks.main(argv)
    assert [r["kl_recall"] for r in again] == [r["kl_recall"] for r in results]
    # ... a longer budget continues the same runs from their checkpoints ...
    capfd.readouterr()
    longer = paper_tasks.main(TINY[2:] + ["--steps", "3", "--tasks", "perfect_recall", "--memories", "introspective",
                                          "--seeds", "0", "--out", str(out)])
    assert longer[0]["steps"] == 3 and "train_s" in longer[0]
    assert "from step 2 to 3" in capfd.readouterr().out
    # ... and a changed definition trains that run again
    changed = paper_tasks.main(TINY + ["--tasks", "perfect_recall", "--memories", "introspective", "--seeds", "0",
                                       "--out", str(out), "--memory-kwargs", "{}"])
    assert changed[0]["definition"]["memory_kwargs"] == "{}" and "train_s" in changed[0]


def test_task_kwargs_reach_the_training_of_that_task_only(tmp_path: Path) -> None:
    # parity's curriculum trains on even prefixes; the other tasks, and every evaluation, are the plain tasks
    out = tmp_path / "runs"
    results = paper_tasks.main(TINY + ["--tasks", "parity_recall", "perfect_recall", "--memories", "none", "--seeds",
                                       "0", "--out", str(out), "--task-kwargs", '{"parity_recall": {"prefix": "even"}}'])
    assert all("error" not in r for r in results), [r.get("traceback") for r in results]
    parity = json.loads((out / "parity_recall" / "none" / "seed0" / "config.json").read_text())
    perfect = json.loads((out / "perfect_recall" / "none" / "seed0" / "config.json").read_text())
    assert json.loads(parity["task_kwargs"]) == {"prefix": "even"} and json.loads(perfect["task_kwargs"]) == {}
    by_task = {r["task"]: r for r in results}
    assert "task_kwargs" not in by_task["perfect_recall"]["definition"]  # the same run as before the flag
    assert by_task["parity_recall"]["task_kwargs"] == {"k": 6}  # evaluated on the plain task (7 frames)
    assert "kl_recall_wrong_parity" in by_task["parity_recall"]
    # how many digits it can count: right vs wrong answer on sequences counting exactly j digits (the ones before
    # even), j = 1 (the last digit's parity) up to k (the task); j = 1 is also reported on its own
    parity_result = by_task["parity_recall"]
    assert parity_result["last_digit_parity_sequences"] > 0 and np.isfinite(parity_result["last_digit_parity_ratio"])
    assert parity_result["last_digit_parity_ratio"] == pytest.approx(
        parity_result["kl_last_digit_parity_right"] / parity_result["kl_last_digit_parity_wrong"])
    by_counted = parity_result["parity_ratio_by_counted"]
    assert list(by_counted) == ["1", "2", "3", "6"] and all(np.isfinite(v) for v in by_counted.values())
    assert by_counted["1"] == pytest.approx(parity_result["last_digit_parity_ratio"])
    accuracy = parity_result["parity_accuracy_by_counted"]
    assert list(accuracy) == list(by_counted) and all(0.0 <= v <= 1.0 for v in accuracy.values())
    assert "last_digit_parity_ratio" not in by_task["perfect_recall"]


def result(memory: str, seed: int, kl_recall: float, kl_other: float = 40.0, **extra) -> dict:
    return {"task": "perfect_recall", "memory": memory, "seed": seed, "kl_recall": kl_recall, "kl_other": kl_other,
            "nll_bound": 900.0, **extra}


def test_table_shows_mean_and_spread_over_seeds_and_the_failed_ones() -> None:
    results = [result("none", 0, 40.0), result("none", 1, 38.0),
               result("lru", 0, 4.0, read_found=0.9, read_chance=0.2, kl_recall_median=2.0, kl_recall_tail_share=0.3),
               result("lru", 1, 12.0, read_found=0.7, read_chance=0.2, kl_recall_median=6.0, kl_recall_tail_share=0.5),
               result("lru", 2, 0.0, error="RuntimeError: boom\ntraceback")]
    rows = paper_tasks.format_table(results).splitlines()[2:]
    # results saved before the median and tail diagnostics show '-' there
    assert rows[0] == ("| perfect_recall | none | 2/2 | 39.0 ± 1.0 | 40.0 ± 0.0 | 0.97 ± 0.03 | 1.00 0.95 | - | - | - | "
                       "fails |")
    assert rows[1] == ("| perfect_recall | lru | 2/3 | 8.0 ± 4.0 | 40.0 ± 0.0 | 0.20 ± 0.10 | 0.10 0.30 | 0.10 ± 0.05 | 40% | "
                       "0.80 (0.20) | recalls; seed 2: error: RuntimeError: boom |")
    # parity's reference is the wrong answer's KL, not the other steps'
    parity = {**result("introspective", 0, 5.0), "task": "parity_recall", "kl_recall_wrong_parity": 10.0}
    assert paper_tasks.ratio(parity) == 0.5 and paper_tasks.verdict(0.5) == "partly"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "copy_task"], "error: --tasks copy_task: expected some of perfect_recall"),
        (["--steps", "0"], "error: --steps 0: expected >= 1"),
        (["--memory-kwargs", "[1]"], "error: --memory-kwargs"),
        (["--prior-outlier", "1.5"], "error: --prior-outlier 1.5: expected a probability in [0, 1)"),
        (["--augment-shift", "9"], "error: --augment-shift 9: expected 0 to 4 pixels"),
        (["--task-kwargs", '{"parity": {"prefix": "even"}}'], "error: --task-kwargs"),
        (["--task-kwargs", '{"parity_recall": {"prefix": "odd"}}'], "error: --task-kwargs {\"prefix\": \"odd\"}: task"),
    ],
)
def test_bad_flags_are_one_line_errors(args: list[str], message: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paper_tasks.py"), *args, "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith(message) and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_killed_benchmark_takes_its_workers_with_it(tmp_path: Path) -> None:
    """SIGKILL the benchmark mid-training: its workers (which would train on as orphans) exit within seconds."""
    import signal
    import time

    argv = [sys.executable, str(ROOT / "benchmarks" / "paper_tasks.py"), *TINY, "--steps", "100000", "--tasks",
            "perfect_recall", "--memories", "none", "--seeds", "0", "1", "--out", str(tmp_path / "runs")]
    bench = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(workers) < 2:  # spawned workers, past their imports
            time.sleep(0.5)
            workers = [p for p in children(bench.pid)
                       if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()
                       and any((tmp_path / "runs" / "perfect_recall" / "none" / f"seed{s}" / "config.json").exists()
                               for s in (0, 1))]
        assert len(workers) == 2, "the workers did not start"
        bench.send_signal(signal.SIGKILL)
        bench.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in workers):
            time.sleep(0.2)
        alive = [p for p in workers if Path(f"/proc/{p}").exists()
                 and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
        assert not alive, f"workers {alive} outlived the benchmark"
    finally:
        bench.kill()
        for p in workers:  # whatever happened, no orphan survives the test
            if Path(f"/proc/{p}").exists():
                os.kill(p, 9)
