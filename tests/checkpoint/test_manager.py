"""The orbax wrapper on its own: round trip, retention, fallback past a damaged newest checkpoint, and one-line
errors for shape mismatches, non-checkpoint directories and a full disk."""

import logging
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from litespark_jax.checkpoint.manager import CheckpointManager, finalized_steps, split_checkpoint_path
from litespark_jax.config import CheckpointConfig
from litespark_jax.errors import CheckpointError


def make_state(value=0.0, n=1000):
    rng = np.random.default_rng(0)
    return {"step": jnp.asarray(int(value), jnp.int32),
            "params": {"w": jnp.asarray(rng.normal(size=(n,)).astype(np.float32) + value),
                       "norm": {"scale": jnp.ones((4,), jnp.bfloat16) * value}}}


def abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def save_steps(directory, steps, cfg=CheckpointConfig(keep_last=10), **kwargs):
    manager = CheckpointManager(str(directory), cfg)
    for step in steps:
        manager.save(step, make_state(step, **kwargs), data_state={"position": step}, config={"step": step})
    manager.close()


def test_round_trip_restores_state_iterator_and_config(tmp_path):
    save_steps(tmp_path, [1, 2])
    restored = CheckpointManager(str(tmp_path), read_only=True).restore(abstract(make_state()))
    assert restored.step == 2 and restored.data_state == {"position": 2} and restored.config == {"step": 2}
    for a, b in zip(jax.tree.leaves(restored.state), jax.tree.leaves(make_state(2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.dtype == b.dtype


def test_keeps_the_last_n_and_every_kth(tmp_path):
    save_steps(tmp_path, range(1, 9), CheckpointConfig(keep_last=2, keep_every=3, async_save=True))
    assert finalized_steps(str(tmp_path)) == [3, 6, 7, 8]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_damaged_newest_checkpoint_falls_back_to_previous_with_warning(tmp_path, caplog, damage):
    save_steps(tmp_path, [1, 2], n=20000)
    data_files = []
    for root, _, files in os.walk(tmp_path / "2" / "state"):
        data_files += [os.path.join(root, f) for f in files if os.sep + "d" + os.sep in os.path.join(root, f)]
    biggest = max(data_files, key=os.path.getsize)
    if damage == "truncate":
        os.truncate(biggest, os.path.getsize(biggest) // 2)
    elif damage == "garbage":
        size = os.path.getsize(biggest)
        with open(biggest, "r+b") as f:
            f.seek(size // 2)
            f.write(np.random.default_rng(1).bytes(64))
    else:
        os.remove(biggest)
    with caplog.at_level(logging.WARNING, logger="litespark_jax"):
        restored = CheckpointManager(str(tmp_path), read_only=True).restore(abstract(make_state(n=20000)))
    assert restored.step == 1
    assert any("falling back" in r.getMessage() and str(tmp_path / "2") in r.getMessage() for r in caplog.records)


def _damage_newest_state(directory, step):
    for root, _, files in os.walk(directory / str(step) / "state"):
        for name in files:
            if os.sep + "d" + os.sep in os.path.join(root, name):
                os.truncate(os.path.join(root, name), 0)


def test_unreadable_steps_are_moved_aside_so_their_numbers_can_be_saved_again(tmp_path):
    save_steps(tmp_path, [1, 2, 3], n=20000)
    _damage_newest_state(tmp_path, 3)
    _damage_newest_state(tmp_path, 2)
    manager = CheckpointManager(str(tmp_path), CheckpointConfig(keep_last=10))
    restored = manager.restore(abstract(make_state(n=20000)))
    assert (restored.step, restored.skipped) == (1, [3, 2])
    manager.set_aside(restored.skipped)
    assert finalized_steps(str(tmp_path)) == [1]
    assert sorted(p.name for p in tmp_path.iterdir() if "unreadable" in p.name) == ["2.unreadable", "3.unreadable"]
    assert manager.save(2, make_state(7, n=20000))  # the retrained step 2, not silently skipped
    manager.close()
    again = CheckpointManager(str(tmp_path), read_only=True).restore(abstract(make_state(n=20000)))
    assert again.step == 2 and again.skipped == []
    np.testing.assert_array_equal(np.asarray(again.state["params"]["w"]),
                                  np.asarray(make_state(7, n=20000)["params"]["w"]))


def test_a_step_another_writer_left_is_an_error_and_a_step_saved_twice_is_saved_once(tmp_path):
    first = CheckpointManager(str(tmp_path))
    assert first.save(1, make_state(1))
    assert first.save(1, make_state(1)) is False  # e.g. a preemption save at the step of a periodic one
    first.wait()
    second = CheckpointManager(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"checkpoint step 1 already exists in .* and this run did not write "
                                              r"it: is another run training into the same checkpoint.dir\?"):
        second.save(1, make_state(2))
    first.close()
    second.close()


def test_a_changed_dtype_is_cast_on_restore_not_reported_as_corruption(tmp_path):
    save_steps(tmp_path, [1, 2])
    state = make_state()
    want = abstract(state)
    want["params"]["w"] = jax.ShapeDtypeStruct((1000,), jnp.bfloat16, sharding=state["params"]["w"].sharding)
    want["params"]["norm"]["scale"] = jax.ShapeDtypeStruct((4,), jnp.float32,
                                                           sharding=state["params"]["norm"]["scale"].sharding)
    restored = CheckpointManager(str(tmp_path), read_only=True).restore(want)
    assert restored.step == 2 and restored.skipped == []
    w, scale = restored.state["params"]["w"], restored.state["params"]["norm"]["scale"]
    assert (w.dtype, scale.dtype) == (jnp.bfloat16, jnp.float32)
    np.testing.assert_array_equal(np.asarray(w), np.asarray(make_state(2)["params"]["w"].astype(jnp.bfloat16)))
    np.testing.assert_array_equal(np.asarray(scale), np.full(4, 2.0, np.float32))


def test_shape_mismatch_names_the_parameter(tmp_path):
    save_steps(tmp_path, [1])
    wrong = make_state(n=999)
    with pytest.raises(CheckpointError, match=r"params\.w.*\(1000,\).*\(999,\)"):
        CheckpointManager(str(tmp_path), read_only=True).restore(abstract(wrong))
    extra = {**make_state(), "params": {**make_state()["params"], "bias": jnp.zeros(3)}}
    with pytest.raises(CheckpointError, match=r"params\.bias"):
        CheckpointManager(str(tmp_path), read_only=True).restore(abstract(extra))


def test_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="is not a checkpoint directory"):
        split_checkpoint_path(str(tmp_path))
    with pytest.raises(CheckpointError, match="does not exist"):
        split_checkpoint_path(str(tmp_path / "missing"))
    save_steps(tmp_path / "ck", [5])
    assert split_checkpoint_path(str(tmp_path / "ck" / "5")) == (str(tmp_path / "ck"), 5)


def test_no_space_left_reports_and_keeps_previous_checkpoint(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("needs permission to mount a small tmpfs")
    try:
        manager = CheckpointManager(str(mount / "ck"), CheckpointConfig(keep_last=5))
        big = 180_000  # ~0.7 MB of incompressible float32: two fit in 2 MB, the third does not
        manager.save(1, make_state(1, n=big))
        manager.save(2, make_state(2, n=big))
        with pytest.raises(CheckpointError, match=r"no space left on device while saving checkpoint step 3 .* the "
                                                  r"previous checkpoint .*/2 is intact"):
            manager.save(3, make_state(3, n=big))
            manager.wait()
        assert finalized_steps(str(mount / "ck")) == [1, 2]
        restored = CheckpointManager(str(mount / "ck"), read_only=True).restore(abstract(make_state(n=big)))
        assert restored.step == 2
        np.testing.assert_array_equal(np.asarray(restored.state["params"]["w"]),
                                      np.asarray(make_state(2, n=big)["params"]["w"]))
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_checkpoint_path_that_is_not_one_names_the_setting_and_the_likely_fix(tmp_path, monkeypatch):
    save_steps(str(tmp_path / "run" / "checkpoints"), [2, 4])
    with pytest.raises(CheckpointError, match=r"^train.resume: checkpoint directory .*/checkpoints/3 does not exist; "
                                              r".*/checkpoints holds the steps \[2, 4\]$"):
        split_checkpoint_path(str(tmp_path / "run" / "checkpoints" / "3"), "train.resume")
    with pytest.raises(CheckpointError, match=r"^train.resume: .*/run is not a checkpoint directory: .*; did you mean "
                                              r"the run's .*/run/checkpoints\?$"):
        split_checkpoint_path(str(tmp_path / "run"), "train.resume")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"train.resume takes auto or never in lower case"):
        split_checkpoint_path("Auto", "train.resume")
    with pytest.raises(CheckpointError, match=r"^posttrain.init_from: .*/gone does not exist \(expected a checkpoint "
                                              r"directory or a Hugging Face model directory\)$"):
        split_checkpoint_path(str(tmp_path / "gone"), "posttrain.init_from", also="or a Hugging Face model directory")


def test_orbax_notes_on_conditions_this_module_reports_are_dropped(caplog):
    """Reading a checkpoint printed three absl warnings (and a garbage step an ERROR split over two lines) above
    our own one-line message."""
    absl_logger = logging.getLogger("absl")
    with caplog.at_level(logging.WARNING):
        absl_logger.warning("Given directory is read only=%s", "/x")
        absl_logger.error("Failed to json parse Metadata file: %s, file content: junk\n, error: ...", "/x/1")
        absl_logger.warning("Metadata file does not exist: %s", "/x/5/_CHECKPOINT_METADATA")
        absl_logger.warning("an orbax warning about something else")
    assert [r.getMessage() for r in caplog.records] == ["an orbax warning about something else"]
