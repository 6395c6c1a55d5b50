"""The paper's sequence tasks (envs/sequences.py): each generator's construction, the batch contract, seeding."""

from __future__ import annotations

import numpy as np
import pytest

from envs.sequences import TASKS, DigitPool, kwargs_for_length, sample_batch, sequence_length, task_fields


def stand_in_pool(seed: int, per_class: int = 30, num_classes: int = 10) -> DigitPool:
    """Random 'digits': every image distinct (its first pixels encode a serial number), labels sorted by class."""
    rng = np.random.default_rng(seed)
    n = per_class * num_classes
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    serial = np.arange(n) + seed * n
    images[:, 0, 0], images[:, 0, 1] = serial % 256, serial // 256  # distinct images within and across pools
    labels = np.repeat(np.arange(num_classes), per_class)
    return DigitPool(images, labels)


@pytest.fixture(scope="module")
def pool() -> DigitPool:
    return stand_in_pool(0)


def same_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B, ...) x (B, ...) frames -> (B,) whether each pair is pixel-identical."""
    return np.all(a.reshape(len(a), 28 * 28) == b.reshape(len(b), 28 * 28), axis=1)


@pytest.mark.parametrize("task", TASKS)
def test_batch_contract(task: str, pool: DigitPool) -> None:
    batch = sample_batch(task, 8, np.random.default_rng(0), source=pool)
    T = sequence_length(task)
    assert batch["obs"].shape == (8, T, 28, 28, 1) and batch["obs"].dtype == np.uint8
    assert batch["prev_action"].shape == (8, T) and batch["prev_action"].dtype == np.int64
    assert np.all(batch["prev_action"] == -1)
    assert batch["revisit"].shape == (8, T) and batch["revisit"].dtype == bool
    assert batch["pose"].shape == (8, T, 0) and batch["pose"].dtype == np.float32
    assert batch["label"].shape == (8, T) and batch["label"].dtype == np.int64
    assert batch["recall_of"].shape == (8, T) and batch["recall_of"].dtype == np.int64
    assert batch["revisit"].any() and not batch["revisit"][:, 0].any()
    # Every frame marked as a copy repeats an earlier frame exactly, and is a recall position.
    b, t = np.nonzero(batch["recall_of"] >= 0)
    src = batch["recall_of"][b, t]
    assert np.all(src < t)
    assert np.all(batch["revisit"][b, t])
    assert np.all(same_image(batch["obs"][b, t], batch["obs"][b, src]))
    assert np.array_equal(batch["label"][b, t], batch["label"][b, src])


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_batch(task: str, pool: DigitPool) -> None:
    a = sample_batch(task, 6, np.random.default_rng(7), source=pool)
    b = sample_batch(task, 6, np.random.default_rng(7), source=pool)
    c = sample_batch(task, 6, np.random.default_rng(8), source=pool)
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert not np.array_equal(a["obs"], c["obs"])


def test_perfect_recall_second_half_is_first_half(pool: DigitPool) -> None:
    k = 7
    batch = sample_batch("perfect_recall", 16, np.random.default_rng(1), source=pool, k=k)
    obs, revisit = batch["obs"], batch["revisit"]
    assert obs.shape[1] == 2 * k
    assert np.array_equal(obs[:, k:], obs[:, :k])
    assert not revisit[:, :k].any() and revisit[:, k:].all()
    # The first half is random: not all the same image.
    assert len(np.unique(obs[:, :k].reshape(-1, 28 * 28), axis=0)) > k


@pytest.mark.parametrize("exemplar", ["fixed", "random"])
def test_parity_image_shows_parity_of_label_sum(exemplar: str, pool: DigitPool) -> None:
    k = 5
    batch = sample_batch("parity_recall", 200, np.random.default_rng(2), source=pool, k=k, exemplar=exemplar)
    labels, obs = batch["label"], batch["obs"]
    parity = labels[:, :k].sum(axis=1) % 2
    assert np.array_equal(labels[:, k], parity)
    assert set(parity.tolist()) == {0, 1}  # both answers occur
    # The label is the true class of the image shown: find each parity image in the pool.
    flat = pool.images.reshape(len(pool), -1)
    found = [np.flatnonzero(np.all(flat == frame.reshape(-1), axis=1)) for frame in obs[:, k]]
    assert all(len(f) == 1 for f in found)
    assert np.array_equal(pool.labels[[f[0] for f in found]], parity)
    n_images = len({f[0] for f in found})
    if exemplar == "fixed":
        assert n_images == 2  # one image per parity: exactly predictable
    else:
        assert n_images > 2
    assert batch["revisit"][:, k].all() and not batch["revisit"][:, :k].any()


@pytest.mark.parametrize("order", ["same", "shuffled"])
def test_one_shot_recall_uses_unseen_classes_and_exemplars(order: str) -> None:
    train, test = stand_in_pool(0), stand_in_pool(1)
    k = 6
    tr = sample_batch("one_shot_recall", 64, np.random.default_rng(3), split="train", source=train, k=k, order=order)
    te = sample_batch("one_shot_recall", 64, np.random.default_rng(3), split="test", source=test, k=k, order=order)
    assert not np.isin(tr["label"], (7, 8, 9)).any()
    assert np.isin(te["label"], (7, 8, 9)).all()
    # No test image occurs among the training images.
    train_images = {bytes(x) for x in train.images.reshape(len(train), -1)}
    assert not any(bytes(x) in train_images for x in te["obs"].reshape(-1, 28 * 28))
    for batch in (tr, te):
        source = batch["recall_of"][:, k:]
        # The recall half is a permutation of the first half: the identity by default (each recall exactly
        # predictable, as for perfect recall), a random one with order='shuffled'.
        assert np.array_equal(np.sort(source, axis=1), np.tile(np.arange(k), (64, 1)))
        assert (source != np.arange(k)).any() == (order == "shuffled")
        src = np.take_along_axis(batch["obs"][:, :k], source[:, :, None, None, None], axis=1)
        assert np.array_equal(batch["obs"][:, k:], src)
    everything = sample_batch("one_shot_recall", 64, np.random.default_rng(3), split="test", source=test, held_out_classes=())
    assert len(np.unique(everything["label"])) == 10


def test_dynamic_dependencies_cue_points_to_the_right_element(pool: DigitPool) -> None:
    k, n_queries, max_back = 5, 8, 4
    batch = sample_batch("dynamic_dependencies", 64, np.random.default_rng(4), source=pool, k=k, n_queries=n_queries, max_back=max_back)
    obs, labels, recall_of = batch["obs"], batch["label"], batch["recall_of"]
    assert obs.shape[1] == k + 2 * n_queries
    cues = np.arange(k, k + 2 * n_queries, 2)
    assert np.isin(labels[:, cues], np.arange(1, max_back + 1)).all()
    assert len(np.unique(labels[:, cues])) == max_back  # every cue value occurs
    for t in cues:
        back = t - labels[:, t]  # the digit d at t says: the next frame repeats x_{t-d}
        assert np.array_equal(recall_of[:, t + 1], back)
        assert same_image(obs[:, t + 1], obs[np.arange(64), back]).all()
        assert batch["revisit"][:, t + 1].all() and not batch["revisit"][:, t].any()
    # The read position moves: across the batch and queries it reaches many distinct earlier positions.
    assert len(np.unique(recall_of[recall_of >= 0])) > 8


def test_similarity_cue_is_same_class_other_exemplar_and_recall_is_exact(pool: DigitPool) -> None:
    k, n_queries = 4, 6
    batch = sample_batch("similarity_cued_recall", 64, np.random.default_rng(5), source=pool, k=k, n_queries=n_queries)
    obs, labels, recall_of = batch["obs"], batch["label"], batch["recall_of"]
    rows = np.arange(64)
    stored = labels[:, :k]
    assert all(len(set(row)) == k for row in stored.tolist())  # distinct classes: the class names the image
    for t in range(k, k + 2 * n_queries, 2):
        which = recall_of[:, t + 1]
        assert np.all((0 <= which) & (which < k))
        assert np.array_equal(labels[:, t], labels[:, t + 1])  # the cue has the recalled image's class
        assert not same_image(obs[:, t], obs[:, t + 1]).any()  # but is a different exemplar
        assert same_image(obs[:, t + 1], obs[rows, which]).all()  # the recall is the exact stored image
        assert batch["revisit"][:, t + 1].all() and not batch["revisit"][:, t].any()


@pytest.mark.parametrize(
    "task, kwargs, match",
    [
        ("copy_task", {}, "unknown task 'copy_task'"),
        ("perfect_recall", {"length": 3}, r"unknown argument\(s\) \['length'\]"),
        ("perfect_recall", {"k": 0}, "k=0, expected an integer >= 1"),
        ("parity_recall", {"exemplar": "mean"}, "exemplar='mean'"),
        ("one_shot_recall", {"order": "reversed"}, "order='reversed', expected 'same' or 'shuffled'"),
        ("dynamic_dependencies", {"k": 3, "max_back": 5}, "max_back=5, expected at most min"),
        ("similarity_cued_recall", {"k": 11}, "k=11, expected at most 10"),
        ("one_shot_recall", {"held_out_classes": tuple(range(10))}, "leaves no classes"),
    ],
)
def test_bad_task_arguments_name_the_problem(task: str, kwargs: dict, match: str, pool: DigitPool) -> None:
    with pytest.raises(ValueError, match=match):
        sample_batch(task, 2, np.random.default_rng(0), source=pool, **kwargs)


def test_bad_split_and_batch_size(pool: DigitPool) -> None:
    with pytest.raises(ValueError, match="split 'valid'"):
        sample_batch("perfect_recall", 2, np.random.default_rng(0), split="valid", source=pool)
    with pytest.raises(ValueError, match="batch_size=0"):
        sample_batch("perfect_recall", 0, np.random.default_rng(0), source=pool)


def test_task_fields_list_defaults() -> None:
    assert task_fields("perfect_recall") == {"k": 10}
    assert sequence_length("dynamic_dependencies", k=4, n_queries=3, max_back=4) == 10


def test_real_digits_one_shot_split_is_unseen() -> None:
    """With the shipped MNIST 5k digits: test sequences of one-shot recall show only held-out classes' test images."""
    from envs.digits import load_digits

    train_images, _ = load_digits(split="train")
    train = sample_batch("one_shot_recall", 32, np.random.default_rng(0), split="train")
    test = sample_batch("one_shot_recall", 32, np.random.default_rng(0), split="test")
    assert set(np.unique(train["label"]).tolist()) <= set(range(7))
    assert set(np.unique(test["label"]).tolist()) <= {7, 8, 9}
    seen = {bytes(x) for x in train_images.reshape(len(train_images), -1)}
    assert not any(bytes(x) in seen for x in test["obs"].reshape(-1, 28 * 28))
    for task in TASKS:  # every task builds from the real digits
        batch = sample_batch(task, 4, np.random.default_rng(1))
        assert batch["obs"].shape == (4, sequence_length(task), 28, 28, 1) and batch["obs"].max() > 0


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("seq_len", [3, 8, 21, 48])
def test_kwargs_for_length_fit_the_trainer_window(task: str, seq_len: int, pool: DigitPool) -> None:
    kwargs = kwargs_for_length(task, seq_len)
    T = sequence_length(task, **kwargs)
    assert seq_len - 2 <= T <= seq_len  # within one pair of the window, never longer
    assert kwargs_for_length(task, T) == kwargs  # a checkpoint's fitted length gives back the same task
    batch = sample_batch(task, 2, np.random.default_rng(0), source=pool, **kwargs)
    assert batch["obs"].shape[1] == T and batch["revisit"].any()


@pytest.mark.parametrize("task", TASKS)
def test_tiny_model_trains_a_few_steps_on_each_task(task: str, tmp_path) -> None:
    """Through the trainer's Python API (as `python -m worldmodel.train --task <task> --preset debug`)."""
    import dataclasses
    import math

    import torch

    from worldmodel import checkpoint
    from worldmodel.config import preset
    from worldmodel.model import batch_to_torch
    from worldmodel.train import train

    cfg = dataclasses.replace(preset("debug"), task=task, memory="introspective", steps=3, out=str(tmp_path / "run"),
                              progress=False, threads=1)
    result = train(cfg)
    assert result["step"] == 3 and result["skipped"] == 0
    assert all(math.isfinite(loss) for _, loss in result["losses"])
    kwargs = kwargs_for_length(task, cfg.seq_len)  # the trainer fits the task into --seq-len
    T = sequence_length(task, **kwargs)
    assert result["config"].seq_len == T
    model, saved = checkpoint.load(tmp_path / "run")
    assert saved.task == task and kwargs_for_length(task, saved.seq_len) == kwargs  # the checkpoint says how to sample
    batch = batch_to_torch(sample_batch(task, 3, np.random.default_rng(0), split="test", **kwargs), "cpu")
    with torch.no_grad():
        seq = model.observe(batch["obs"], batch["prev_action"], batch["pose"])
    assert seq["kl"].shape == (3, T) and torch.isfinite(seq["kl"]).all()


def test_parity_images_are_the_fixed_answers(pool: DigitPool) -> None:
    from envs.sequences import parity_images

    answers = parity_images(source=pool)  # (2, 28, 28), the same pair in every split
    batch = sample_batch("parity_recall", 32, np.random.default_rng(0), split="test", source=pool, k=3)
    last = batch["obs"][:, -1, :, :, 0]
    assert np.array_equal(last, answers[batch["label"][:, -1]])
    assert not np.array_equal(answers[0], answers[1])


def test_image_sets_missing_needed_classes_are_named(pool: DigitPool) -> None:
    no_small_digits = pool.subset((5, 6, 7, 8, 9))
    with pytest.raises(ValueError, match="no class 0 or 1"):
        sample_batch("parity_recall", 2, np.random.default_rng(0), source=no_small_digits)
    with pytest.raises(ValueError, match=r"cues need classes 1\.\.3"):
        sample_batch("dynamic_dependencies", 2, np.random.default_rng(0), source=no_small_digits, k=3, max_back=3)


@pytest.mark.parametrize("task", ["perfect_recall", "dynamic_dependencies", "similarity_cued_recall"])
def test_shift_moves_each_image_and_a_recall_keeps_its_images_move(task: str, pool: DigitPool) -> None:
    """Augmentation (`shift`): every frame is its own image moved by at most `shift` pixels (zero filled), and a
    recall is still pixel for pixel the frame it recalls; shift=0 draws no extra numbers (batches unchanged)."""
    plain = sample_batch(task, 32, np.random.default_rng(5), source=pool)
    moved = sample_batch(task, 32, np.random.default_rng(5), source=pool, shift=2)
    assert np.array_equal(plain["label"], moved["label"]) and np.array_equal(plain["recall_of"], moved["recall_of"])
    padded = np.pad(plain["obs"][..., 0], ((0, 0), (0, 0), (2, 2), (2, 2)))  # (B, T, 32, 32)
    B, T = plain["label"].shape
    for b in range(B):
        for t in range(T):
            found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                     if np.array_equal(moved["obs"][b, t, :, :, 0], padded[b, t, 2 - dy: 30 - dy, 2 - dx: 30 - dx])]
            assert found, f"frame {b},{t} is not its image moved by <= 2 px"
    assert not np.array_equal(plain["obs"], moved["obs"])
    b, t = np.nonzero(moved["recall_of"] >= 0)
    assert len(b) and same_image(moved["obs"][b, t], moved["obs"][b, moved["recall_of"][b, t]]).all()
    assert np.array_equal(sample_batch(task, 32, np.random.default_rng(5), source=pool, shift=0)["obs"], plain["obs"])
    with pytest.raises(ValueError, match="shift=14, expected an integer in"):
        sample_batch(task, 2, np.random.default_rng(5), source=pool, shift=14)


def test_training_source_moves_train_images_only() -> None:
    from worldmodel.train import TaskSource

    source = TaskSource("perfect_recall", 10, shift=2)
    test = source.sample(8, np.random.default_rng(1), split="test")["obs"]
    assert np.array_equal(test, TaskSource("perfect_recall", 10).sample(8, np.random.default_rng(1), split="test")["obs"])
    train = source.sample(8, np.random.default_rng(1))["obs"]
    assert not np.array_equal(train, TaskSource("perfect_recall", 10).sample(8, np.random.default_rng(1))["obs"])
