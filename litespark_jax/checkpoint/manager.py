"""Orbax checkpoints of a training run: save asynchronously, keep the last N plus every K-th, restore the newest
good one onto any mesh.

One checkpoint is one orbax step directory ``DIR/<step>/`` with four items:

- ``state``: the ``TrainState`` flattened to ``{"params.layers.attention.wq": array, ...}`` (readable names, so a
  shape mismatch names the parameter, and restore does not depend on pytree node types);
- ``meta``: JSON with the step, the seed, a checksum per array and the format version;
- ``data``: JSON state of the data iterator (``get_state()``), or null;
- ``config``: the resolved ``Config`` as JSON.

Orbax writes into a temporary directory and renames it when every item is written, so only finalized steps are
ever listed. On restore the newest step is tried first; when its files are truncated or corrupted (orbax fails
to read them, or the restored arrays disagree with the checksums recorded at save time) it is skipped with a
warning and the previous step is tried. A checkpoint whose shapes disagree with the model is not corruption: that
raises ``CheckpointError`` naming the parameter at once.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from litespark_jax.config import CheckpointConfig
from litespark_jax.errors import CheckpointError
from litespark_jax.parallel.distributed import per_process

log = logging.getLogger("litespark_jax")

FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------
# Flat, named views of a pytree


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _is_variable_value(key) -> bool:
    return isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value"


def flatten(tree) -> tuple[dict[str, Any], Any]:
    """``{dotted name: leaf}`` and the treedef to rebuild ``tree`` (nnx ``Variable.value`` hops are dropped)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat = {}
    for path, leaf in leaves:
        name = ".".join(_key_name(k) for k in path if not _is_variable_value(k))
        if name in flat:
            raise ValueError(f"two leaves flatten to the same checkpoint name {name!r}")
        flat[name] = leaf
    return flat, treedef


def unflatten(flat: dict[str, Any], like) -> Any:
    names, treedef = flatten(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[name] for name in names])


# ----------------------------------------------------------------------------------------------------------------
# Checksums: exact integer sums of the bits, independent of sharding and reduction order (wrapping uint32)


def _checksum(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    if jax.typeof(x).memory_space == jax.memory.Space.Host:  # optim.offload_state: moments in pinned host memory
        x = jax.device_put(x, jax.memory.Space.Device)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize])
    bits = bits.astype(jnp.uint32).reshape(-1)
    # Position-weighted so swapped or shifted chunks change the sum, not only flipped bits.
    weights = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


_checksums = jax.jit(lambda flat: {k: _checksum(v) for k, v in flat.items()})


def checksums(flat: dict[str, Any]) -> dict[str, int]:
    return {k: int(v) for k, v in jax.device_get(_checksums(flat)).items()}


# ----------------------------------------------------------------------------------------------------------------
# Locating checkpoints


def _is_step_dir(path: str) -> bool:
    return os.path.basename(os.path.normpath(path)).isdigit() and os.path.isfile(
        os.path.join(path, "_CHECKPOINT_METADATA"))


class _OrbaxNotes(logging.Filter):
    """Drops orbax's log lines about conditions this module reports itself, in one line naming the step: a
    checkpoint opened read-only (said on every generate, convert and init_from), a step's metadata that is garbage
    or missing (the restore's fallback and errors name it)."""

    PREFIXES = ("Given directory is read only", "Failed to json parse Metadata file", "Metadata file does not exist")

    def filter(self, record):
        return not str(record.msg).startswith(self.PREFIXES)


logging.getLogger("absl").addFilter(_OrbaxNotes())


def _move_aside(source: str, suffix: str) -> str:
    """Rename ``source`` to ``source + suffix`` (or ``suffix2``, ``suffix3``... if taken); returns the new path."""
    target, n = source + suffix, 1
    while os.path.exists(target):
        n += 1
        target = f"{source}{suffix}{n}"
    os.rename(source, target)
    return target


def finalized_steps(directory: str) -> list[int]:
    """Steps with a finalized (renamed, complete) orbax directory, oldest first; temporary ones are ignored."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isfile(os.path.join(directory, name, "_CHECKPOINT_METADATA")))


def split_checkpoint_path(path: str, setting: str | None = None, also: str = "") -> tuple[str, int | None]:
    """``DIR`` -> (DIR, None: its newest good step); ``DIR/<step>`` -> (DIR, step). Not a checkpoint: an error,
    naming ``setting`` (e.g. ``train.resume``) when given; ``also`` adds what else the setting accepts."""
    given = path
    path = os.path.abspath(os.path.expanduser(path))
    where = f"{setting}: " if setting else ""
    also = f" {also}" if also else ""
    parent = os.path.dirname(path)
    if not os.path.exists(path):
        hint = ""
        if os.path.basename(path).isdigit() and (steps := finalized_steps(parent)):
            hint = f"; {parent} holds the steps {steps}"
        elif setting == "train.resume" and given.strip().lower() in ("auto", "never"):
            hint = " (train.resume takes auto or never in lower case, or a checkpoint directory)"
        what = f"checkpoint directory {path} does not exist" if not also else \
            f"{path} does not exist (expected a checkpoint directory{also})"
        raise CheckpointError(f"{where}{what}{hint}")
    if _is_step_dir(path):
        return os.path.dirname(path), int(os.path.basename(path))
    if not finalized_steps(path):
        inside = os.path.join(path, "checkpoints")
        hint = f"; did you mean the run's {inside}?" if finalized_steps(inside) else ""
        raise CheckpointError(
            f"{where}{path} is not a checkpoint directory{also}: it holds no finalized step directories (like "
            f"{path}/1000 with a _CHECKPOINT_METADATA file){hint}")
    return path, None


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    """The restored tree (same structure as the abstract target), placed with the target's shardings."""
    data_state: dict | None
    config: dict
    meta: dict
    path: str
    skipped: list[int] = dataclasses.field(default_factory=list)
    """Newer steps that were unreadable and passed over to reach this one."""


class CheckpointManager:
    """Thin wrapper of ``orbax.checkpoint.CheckpointManager`` for ``TrainState`` plus run metadata."""

    def __init__(self, directory: str, cfg: CheckpointConfig = CheckpointConfig(), *, read_only: bool = False):
        self.directory = os.path.abspath(os.path.expanduser(directory))
        self.cfg = cfg
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else cfg.keep_last,  # what orbax sets for a reader anyway, with a warning
            keep_period=cfg.keep_every or None,
            enable_async_checkpointing=cfg.async_save,
            create=not read_only,
            read_only=read_only,
            save_interval_steps=0 if read_only else 1,
        )
        try:
            handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                        "data": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        except OSError as e:
            raise CheckpointError(f"cannot open checkpoint directory {self.directory}: {e.strerror or e}") from None
        self._pending: int | None = None
        self._written: set[int] = set()
        self.read_only = read_only

    # -- saving --------------------------------------------------------------------------------------------------

    def save(self, step: int, state, *, data_state: dict | None = None, config: dict | None = None,
             seed: int = 0, force: bool = False) -> bool:
        """Start saving ``state`` as ``step``; returns once the arrays are copied off the devices (async) or
        written (sync). Raises ``CheckpointError`` when this or the previous background save failed (e.g. no space
        left); the previous finalized checkpoint is then still intact. A step this manager already saved is not
        saved again (False); a step some other writer left in the directory is an error, never silently kept."""
        self.check_for_errors()
        if step in self._written:  # possibly still being written in the background
            return False
        if step in self.all_steps():
            raise CheckpointError(
                f"checkpoint step {step} already exists in {self.directory} and this run did not write it: is "
                f"another run training into the same checkpoint.dir?")
        flat, _ = flatten(state)
        meta = {"format": FORMAT_VERSION, "step": int(step), "seed": int(seed), "checksums": checksums(flat)}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(flat),
            meta=ocp.args.JsonSave(meta),
            data=ocp.args.JsonSave({"iterator": data_state}),
            config=ocp.args.JsonSave(config or {}),
        )
        try:
            saved = self._manager.save(step, args=args, force=force)
        except Exception as e:  # noqa: BLE001 - orbax wraps OSErrors in various types
            raise self._save_error(step, e) from e
        if saved:
            self._pending = step
            self._written.add(step)
            if not self.cfg.async_save:
                self.wait()
        return saved

    def wait(self) -> None:
        """Block until the background save is finalized; raise ``CheckpointError`` if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_error(self._pending, e) from e
        self._pending = None

    def check_for_errors(self) -> None:
        try:
            self._manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._save_error(self._pending, e) from e

    def _save_error(self, step, error: BaseException) -> CheckpointError:
        try:  # let an earlier save still in flight finish first: its temporary directory must not be removed
            self._manager.wait_until_finished()
        except Exception:  # noqa: BLE001 - that save failed too; its partial directory goes below
            pass
        self.remove_partial_saves()
        previous = [s for s in finalized_steps(self.directory) if step is None or s < step]
        kept = f"; the previous checkpoint {self.directory}/{previous[-1]} is intact" if previous else ""
        if _is_no_space(error):
            return CheckpointError(f"no space left on device while saving checkpoint step {step} to "
                                   f"{self.directory}{kept}")
        return CheckpointError(f"saving checkpoint step {step} to {self.directory} failed: "
                               f"{_one_line(error)}{kept}")

    def remove_partial_saves(self) -> None:
        """Delete unfinalized step directories of a failed or killed save (never restored; they only hold disk
        space). Only while no save of this directory is in flight."""
        if self.read_only or jax.process_index() != 0 or not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if ".orbax-checkpoint-tmp" in name and name.split(".")[0].isdigit():
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def set_aside_incomplete(self) -> None:
        """Rename step-named directories that hold no finalized checkpoint (no ``_CHECKPOINT_METADATA``: copied in by
        hand, or left by another tool) to ``<step>.incomplete``. They are never restored, and saving that step
        number later would fail mid-run because the directory exists. Every process calls it at the start of a
        run; process 0 renames."""
        if self.read_only:
            return
        if jax.process_index() == 0 and os.path.isdir(self.directory):
            for name in sorted(os.listdir(self.directory)):
                source = os.path.join(self.directory, name)
                if name.isdigit() and os.path.isdir(source) and not _is_step_dir(source):
                    target = _move_aside(source, ".incomplete")
                    log.warning("warning: %s holds no finalized checkpoint (no _CHECKPOINT_METADATA); moved it aside "
                                "to %s", source, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("litespark_checkpoint_set_aside_incomplete")
        self._manager.reload()  # orbax listed the directory's steps when it opened it

    def set_aside(self, steps: list[int]) -> None:
        """Rename unreadable step directories to ``<step>.unreadable`` so that no restore tries them again and a
        retrained step can be saved under the same number; their files stay on disk for inspection."""
        if not steps or self.read_only:
            return
        if jax.process_index() == 0:
            for step in steps:
                source = os.path.join(self.directory, str(step))
                target = _move_aside(source, ".unreadable")
                log.warning("warning: moved the unreadable checkpoint %s aside to %s", source, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("litespark_checkpoint_set_aside")
        self._manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """True when JAX's multi-host preemption notice says every process should save at ``step``."""
        try:
            return bool(self._manager.reached_preemption(step))
        except Exception:  # noqa: BLE001 - no distributed client: nothing to agree on
            return False

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    # -- restoring -----------------------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        return finalized_steps(self.directory)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, abstract_state, step: int | None = None) -> Restored:
        """Restore the newest good step (or exactly ``step``) onto the shardings of ``abstract_state`` (a tree of
        ``jax.ShapeDtypeStruct`` with ``sharding=``). Corrupted newer steps are skipped with a warning."""
        return self._newest_good(lambda candidate: self._restore_step(abstract_state, candidate), step)

    def restore_arrays(self, prefix: str = "params.", step: int | None = None) -> Restored:
        """Only the arrays whose names start with ``prefix`` (e.g. the parameters, for export), on one device, as a
        flat ``{name without prefix: array}``; same fallback and checksum checks as ``restore``."""
        return self._newest_good(lambda candidate: self._restore_subset(prefix, candidate), step)

    def restore_params(self, abstract_params, step: int | None = None) -> Restored:
        """Only the parameters (``params.*``), onto the shardings of ``abstract_params`` (a tree of
        ``jax.ShapeDtypeStruct``): starting weights for another run, whatever optimizer the checkpoint was saved
        with. Same fallback, shape, checksum and dtype handling as ``restore``."""
        return self._newest_good(lambda candidate: self._restore_params(abstract_params, candidate), step)

    def _newest_good(self, restore_step, step: int | None) -> Restored:
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"{self.directory} is not a checkpoint directory: it holds no finalized steps")
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"checkpoint step {step} not found in {self.directory} (have {steps})")
            try:
                return restore_step(step)
            except _Corrupted as e:
                raise CheckpointError(f"checkpoint {self.directory}/{step} is unreadable: {e}") from None
        failures, skipped = [], []
        for candidate in reversed(steps):
            try:
                restored = restore_step(candidate)
            except _Corrupted as e:
                if candidate != steps[0]:  # the last one's failure is the error below
                    log.warning("warning: checkpoint %s/%d is unreadable (%s); falling back to the previous one",
                                self.directory, candidate, e)
                failures.append(f"{candidate}: {e}")
                skipped.append(candidate)
                continue
            restored.skipped = skipped
            return restored
        raise CheckpointError(f"no readable checkpoint in {self.directory}: " + "; ".join(failures))

    def _read_meta(self, step: int) -> tuple[dict, dict]:
        path = os.path.join(self.directory, str(step))
        meta = metadata = error = None
        try:
            meta = _read_json(path, "meta")
            metadata = self._manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001
            error = _Corrupted(_one_line(e))
        _raise_unless_every_process_read(error)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            raise _Corrupted(f"{path}/meta is not a LiteSpark checkpoint of format {FORMAT_VERSION}")
        saved = getattr(metadata, "tree", metadata)
        if not isinstance(saved, dict):
            raise _Corrupted(f"{path}/state has no readable metadata")
        return meta, saved

    def _read_some(self, step: int, target: dict) -> tuple[dict, dict]:
        """(the arrays named in ``target``, read as its ShapeDtypeStructs say; the run config) of one step."""
        path = os.path.join(self.directory, str(step))
        flat = config = error = None
        handler = ocp.PyTreeCheckpointHandler()
        try:
            flat = handler.restore(epath.Path(path) / "state", args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
            config = _read_json(path, "config")
        except Exception as e:  # noqa: BLE001
            error = _Corrupted(_one_line(e))
        finally:
            handler.close()
        _raise_unless_every_process_read(error)
        return flat, config or {}

    def _restore_subset(self, prefix: str, step: int) -> Restored:
        path = os.path.join(self.directory, str(step))
        meta, saved = self._read_meta(step)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        target = {name: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device)
                  for name, m in saved.items() if name.startswith(prefix)}
        if not target:
            raise CheckpointError(f"checkpoint {path} holds no arrays named {prefix}*")
        flat, config = self._read_some(step, target)
        _verify_checksums(flat, meta)
        return Restored(step=step, state={k[len(prefix):]: v for k, v in flat.items()}, data_state=None,
                        config=config, meta=meta, path=path)

    def _restore_params(self, abstract_params, step: int) -> Restored:
        path = os.path.join(self.directory, str(step))
        meta, saved = self._read_meta(step)
        target = {"params." + name: want for name, want in flatten(abstract_params)[0].items()}
        _check_compatible({name: m for name, m in saved.items() if name.startswith("params.")}, target, path)
        as_saved = _in_saved_dtypes(target, saved)
        flat, config = self._read_some(step, as_saved)
        _verify_checksums(flat, meta)
        flat = _cast_to(flat, target, path)
        params = unflatten({name[len("params."):]: value for name, value in flat.items()}, abstract_params)
        return Restored(step=step, state=params, data_state=None, config=config, meta=meta, path=path)

    def _restore_step(self, abstract_state, step: int) -> Restored:
        path = os.path.join(self.directory, str(step))
        target, _ = flatten(abstract_state)
        meta, saved = self._read_meta(step)
        _check_compatible(saved, target, path)
        as_saved = _in_saved_dtypes(target, saved)  # e.g. optim.state_dtype changed between runs: cast after
        restored = error = None
        handler = ocp.StandardCheckpointHandler()
        try:
            restored = {"state": handler.restore(epath.Path(path) / "state", args=ocp.args.StandardRestore(as_saved)),
                        "data": _read_json(path, "data"), "config": _read_json(path, "config")}
        except Exception as e:  # noqa: BLE001
            error = _Corrupted(_one_line(e))
        finally:
            handler.close()
        _raise_unless_every_process_read(error)
        flat = restored["state"]
        _verify_checksums(flat, meta)
        flat = _cast_to(flat, target, path)
        data = restored["data"] or {}
        return Restored(step=step, state=unflatten(flat, abstract_state), data_state=data.get("iterator"),
                        config=restored["config"] or {}, meta=meta, path=path)

    def read_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


class _Corrupted(Exception):
    """A checkpoint step whose files cannot be read back as written."""


def _read_json(step_path: str, item: str):
    """One JSON item of a step, through orbax's handler rather than its checkpointer: the checkpointer ends every
    read in a barrier of all processes, where the others waited forever for a process whose read had failed."""
    return ocp.JsonCheckpointHandler().restore(epath.Path(step_path) / item, args=ocp.args.JsonRestore())


def _raise_unless_every_process_read(error: _Corrupted | None) -> None:
    """Raise on every process when any could not read its part of a step. Each process reads only its own shards, so
    one alone fell back to an older step while the others went on into this step's collectives (checksums, the
    set-aside barrier). The reads go through orbax's handlers, whose restores hold no barrier (its checkpointers end
    each read in one, which a failed process never reached), so this allgather is the only one."""
    failed = per_process(error is not None)
    if error is None and failed.any():
        error = _Corrupted(f"process {int(np.flatnonzero(failed)[0])} could not read its part of it")
    if error is not None:
        raise error


def _verify_checksums(flat: dict, meta: dict) -> None:
    expected = meta.get("checksums", {})
    actual = checksums(flat)
    bad = [name for name in flat if expected.get(name) != actual[name]]
    if bad:
        raise _Corrupted(f"checksum mismatch in {bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""))


def _in_saved_dtypes(target: dict, saved: dict) -> dict:
    """``target``'s shapes and shardings with the dtypes the checkpoint holds: read as written (the checksums are of
    those bits), then ``_cast_to`` the target's dtypes."""
    return {name: jax.ShapeDtypeStruct(want.shape, saved[name].dtype, sharding=want.sharding)
            for name, want in target.items()}


def _cast_to(flat: dict, target: dict, path: str) -> dict:
    """Arrays whose saved dtype differs from the target's, cast on their devices (same sharding)."""
    changed = {name: (flat[name].dtype, want.dtype) for name, want in target.items() if flat[name].dtype != want.dtype}
    if not changed:
        return flat
    kinds = sorted({f"{jnp.dtype(have).name} -> {jnp.dtype(want).name}" for have, want in changed.values()})
    log.warning("checkpoint %s: %d array(s) cast to the dtypes of this run's config (%s; e.g. %s)", path,
                len(changed), ", ".join(kinds), next(iter(changed)))
    cast = {name: jax.jit(lambda x, dtype=target[name].dtype: x.astype(dtype),
                          out_shardings=target[name].sharding)(flat[name]) for name in changed}
    return {**flat, **cast}


def first_mismatch(have: dict, want: dict) -> tuple[str, str] | None:
    """The first way two {name: array-like} trees differ: ``("missing", name)`` for a name only ``want`` has,
    ``("shape", name)`` for one shaped otherwise, ``("extra", name)`` for one only ``have`` has; None if none."""
    for kind, names in (("missing", (n for n in want if n not in have)),
                        ("shape", (n for n in want if tuple(have[n].shape) != tuple(want[n].shape))),
                        ("extra", (n for n in have if n not in want))):
        name = next(names, None)
        if name is not None:
            return kind, name
    return None


def _check_compatible(saved: dict, target: dict, path: str) -> None:
    def what(name: str) -> str:
        return "parameter" if name.startswith("params.") else "optimizer/state array"

    mismatch = first_mismatch(saved, target)
    if mismatch is None:
        return
    kind, name = mismatch
    if kind == "missing":
        raise CheckpointError(f"checkpoint {path} has no {what(name)} {name!r} that this run needs (the model or "
                              f"optimizer config differs from the one it was saved with)")
    if kind == "shape":
        raise CheckpointError(f"checkpoint {path}: {what(name)} {name!r} has shape {tuple(saved[name].shape)} but "
                              f"the config needs {tuple(target[name].shape)}")
    raise CheckpointError(f"checkpoint {path} has {what(name)} {name!r} that this run does not (the model or "
                          f"optimizer config differs from the one it was saved with)")


def _is_no_space(error: BaseException) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        text = str(error)
        if "No space left" in text or "ENOSPC" in text or "RESOURCE_EXHAUSTED" in text and "space" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) < 300 else text[:300] + "..."


def abstract_with_shardings(shapes, shardings):
    """Pair a tree of shapes with a tree of shardings as ``jax.ShapeDtypeStruct(..., sharding=...)``."""
    flat_shapes, treedef = flatten(shapes)
    flat_shardings, _ = flatten(shardings)
    return jax.tree_util.tree_unflatten(treedef, [
        jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=flat_shardings[name]) for name, s in flat_shapes.items()])

