"""SFT and DPO trainers: the pretraining ``Trainer`` (mesh, shardings, optimizer, checkpoints, metrics) with
post-training data, starting weights and, for DPO, another step.

Both are passed to ``litespark_jax.train.loop.train(config, trainer=...)``, so logging, tokens/s, MFU, eval,
checkpointing, resume and preemption are the pretraining loop's. ``train.resume=auto`` resumes a post-training run
from its own checkpoints; a fresh run starts from ``posttrain.init_from``.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from litespark_jax.config import Config
from litespark_jax.data.global_batch import process_local_rows
from litespark_jax.data.pipeline import check_identity
from litespark_jax.errors import ConfigError, DataError
from litespark_jax.parallel.distributed import per_process
from litespark_jax.posttrain import dpo_data, sft_data
from litespark_jax.posttrain.dpo_loss import make_dpo_eval, make_dpo_gradients, token_logps
from litespark_jax.posttrain.template import TemplateTokens, get_template
from litespark_jax.train.loop import Trainer
from litespark_jax.train.state import TrainState, abstract_model, init_model

log = logging.getLogger("litespark_jax")

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
BUNDLED = {"sft": ("sft_train.jsonl", "sft_eval.jsonl"), "dpo": ("dpo_train.jsonl", "dpo_eval.jsonl")}


def data_files(config: Config, kind: str) -> tuple[str, str | None]:
    """(train file, eval file or None): the configured ones, or the bundled examples."""
    p = config.posttrain
    for key, path in (("posttrain.train_file", p.train_file), ("posttrain.eval_file", p.eval_file)):
        if path is not None and not os.path.isfile(path):
            if not os.path.exists(path) and any(c in path for c in "*?["):
                raise DataError(f"{key}: {path} looks like a glob; it takes one JSONL file (concatenate the files, "
                                f"or name one)")
            raise DataError(f"{key}: {path} is not a file" if os.path.exists(path) else
                            f"{key}: {path} does not exist")
    if p.train_file is None:
        train, evaluation = BUNDLED[kind]
        return str(EXAMPLES_DIR / train), p.eval_file or str(EXAMPLES_DIR / evaluation)
    return p.train_file, p.eval_file


# ----------------------------------------------------------------------------------------------------------------
# Starting weights


def is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def load_hf_params(path: str, model_cfg) -> dict:
    """A Hugging Face Llama directory as our pure parameter dict (``litespark_jax.convert``'s importer); the model
    section must describe the same shape (ConfigError naming the first field that differs)."""
    from litespark_jax.convert import load_hf_params as convert_load, shape_difference

    theirs, params = convert_load(path, model_cfg)
    if problem := shape_difference(f"{path}/config.json", theirs, model_cfg, "posttrain.init_from"):
        raise ConfigError(problem)
    return params


def resumes(config: Config) -> bool:
    """Whether the run will restore a checkpoint (``train.resume``: a path, or ``auto`` with finalized steps in
    ``checkpoint.dir``) rather than start from ``posttrain.init_from``."""
    from litespark_jax.checkpoint.manager import finalized_steps
    from litespark_jax.checkpoint.session import checkpoint_dir

    resume = config.train.resume
    return resume not in ("auto", "never") or (resume == "auto" and bool(finalized_steps(checkpoint_dir(config))))


class _PosttrainMixin:
    """Template, starting weights and batching shared by SFT and DPO."""

    kind = "sft"

    def check_eval_data(self) -> None:
        """The SFT/DPO evaluation files were read when the trainer was built."""

    def _setup_posttrain(self, config: Config):
        p = config.posttrain
        p.validate()
        self.template_tokens = TemplateTokens(get_template(p.template), self.tokenizer, p.system_prompt)
        self.template_tokens.check_vocab(config.model.vocab_size)
        self.train_file, self.eval_file = data_files(config, self.kind)
        self._check_init_from(config)
        self._initial = None
        # This process's block of rows (Trainer.row_shard): processes holding the same rows build the same ones.
        self.local_rows = config.train.global_batch_size // self.row_shards

    def _check_init_from(self, config: Config) -> None:
        """A LiteSpark checkpoint in ``posttrain.init_from`` that is missing, not a checkpoint, or of another model
        shape (the field named, from its saved config) is an error now, before the data is tokenized and the run
        directory made; a run that will resume from its own checkpoints does not read it and is not checked."""
        from litespark_jax.checkpoint.manager import CheckpointManager, finalized_steps, split_checkpoint_path
        from litespark_jax.config import from_dict
        from litespark_jax.convert import shape_difference

        source = config.posttrain.init_from
        if source is None or resumes(config) or is_hf_dir(source):  # a Hugging Face directory is checked as read
            return
        root, step = split_checkpoint_path(source, "posttrain.init_from", also="or a Hugging Face model directory")
        step = finalized_steps(root)[-1] if step is None else step
        manager = CheckpointManager(root, config.checkpoint, read_only=True)
        try:
            theirs = from_dict({"model": manager.read_config(step)["model"]}, f"{root}/{step}/config").model
        except Exception:  # noqa: BLE001 - an unreadable config: loading the weights says what is wrong, or falls back
            return
        finally:
            manager.close()
        if problem := shape_difference(f"the saved config of {root}/{step}", theirs, config.model,
                                       "posttrain.init_from"):
            raise ConfigError(problem)

    def initial_params(self):
        """The starting weights (``posttrain.init_from``, else the seeded random init) on the parameter shardings;
        loaded once and kept."""
        if self._initial is None:
            self._initial = self._load_initial_params()
        return self._initial

    def _load_initial_params(self):
        source = self.config.posttrain.init_from
        params_sharding = self.state_sharding.params
        if source is None:
            cfg, seed = self.config.model, self.config.train.seed
            with self._sharding_context():
                params = jax.jit(lambda: init_model(cfg, seed)[1], out_shardings=params_sharding)()
        elif is_hf_dir(source):
            pure = load_hf_params(source, self.config.model)
            _, abstract = abstract_model(self.config.model)
            dtype = jnp.dtype(self.config.model.param_dtype)
            nnx.replace_by_pure_dict(abstract, jax.tree.map(lambda a: np.asarray(a, dtype), pure))
            params = jax.device_put(abstract, params_sharding)
        else:
            params = self._load_checkpoint_params(source)
        log.info("starting weights: %s", source or f"random init (seed {self.config.train.seed})")
        return params

    def _load_checkpoint_params(self, source: str):
        """The parameters alone: the optimizer state is not read, so the checkpoint's optimizer settings (and
        the memory its moments would take) do not matter."""
        from litespark_jax.checkpoint.manager import CheckpointManager, abstract_with_shardings, split_checkpoint_path

        root, step = split_checkpoint_path(source, "posttrain.init_from", also="or a Hugging Face model directory")
        manager = CheckpointManager(root, self.config.checkpoint, read_only=True)
        try:
            with self._sharding_context():
                target = abstract_with_shardings(jax.eval_shape(lambda: Trainer.init_state(self)),
                                                 self.state_sharding).params
                restored = manager.restore_params(target, step)
        finally:
            manager.close()
        return restored.state

    # Whether the starting weights are needed after the state is built (DPO's reference); when not, and nobody was
    # handed them by ``initial_params``, the state takes their buffers instead of a copy (SFT kept a second float32
    # copy of the model on the device for the whole run).
    keeps_initial_params = False

    def init_state(self) -> TrainState:
        """Step 0 at the starting weights with a fresh optimizer."""
        keep = self.keeps_initial_params or self._initial is not None
        params = self.initial_params() if keep else self._load_initial_params()

        def init(p):
            if keep:  # a copy, so donating the state later leaves ``initial_params`` intact
                p = jax.tree.map(jnp.copy, p)
            return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=self.optimizer.init(p))

        with self._sharding_context():
            return jax.jit(init, out_shardings=self.state_sharding, donate_argnums=() if keep else 0)(params)

    def _pad_rows(self, batch: dict) -> dict:
        """A short final eval batch padded with empty rows (no loss) to the batch size."""
        rows = next(iter(batch.values())).shape[0]
        if rows == self.local_rows:
            return batch
        return {k: np.concatenate([v, np.zeros((self.local_rows - rows, *v.shape[1:]), v.dtype)]) for k, v in
                batch.items()}

    def _empty_batch(self) -> dict:
        """A batch of empty rows (no loss), for a process whose shard has run out."""
        raise NotImplementedError

    def _agreed_batches(self, batches, limit: int | None) -> list[dict]:
        """This process's eval batches (at most ``limit``), padded with empty batches to the count of the process
        with the most. Each batch is one collective step and the processes' shards can differ in size (``pairs[i::n]``,
        or packed rows), so a process that stopped early left the others waiting for it forever."""
        local = [self._pad_rows(b) for b in itertools.islice(batches, limit)]
        count = int(per_process(len(local)).max())
        return local + [self._empty_batch() for _ in range(count - len(local))]


# ----------------------------------------------------------------------------------------------------------------
# SFT


_POSITION_SETTINGS = {  # what a user changes to make a field of a saved post-training data position differ
    "kind": "the kind of run (sft or dpo)", "seed": "train.seed", "seq_len": "train.seq_len",
    "global_batch_size": "train.global_batch_size", "pack": "posttrain.pack", "packing_bins": "posttrain.packing_bins",
    "examples": "the examples (posttrain.train_file, tokenized with posttrain.template and posttrain.truncation)",
}


def examples_digest(examples: list[dict]) -> str:
    """A short digest of the tokenized examples (SFT) or pairs (DPO): every token array of every one, in order.
    DPO's precomputed reference log-probs are left out: each process holds only its own pairs' (and another device
    count may round them differently), and they follow from the tokens and the starting weights."""
    digest = hashlib.sha256()

    def add(item):
        if isinstance(item, dict):
            for key in sorted(item):
                if key == "ref_logps":
                    continue
                digest.update(key.encode())
                add(item[key])
        else:
            array = np.ascontiguousarray(item)
            digest.update(str(array.dtype).encode() + str(array.shape).encode())
            digest.update(array.tobytes())

    for example in examples:
        add(example)
    return digest.hexdigest()[:16]


class CheckedPosition:
    """A post-training data iterator whose saved position also holds what decides its batches, as pretraining's
    ``BatchIterator`` does: a resume with another train file, template, seed, sequence length, batch or packing is
    refused naming the setting, instead of carrying on from the same index into other batches."""

    def __init__(self, iterator, identity: dict):
        self._iterator, self._identity = iterator, identity

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._iterator)

    def get_state(self) -> dict:
        return {**self._identity, "position": self._iterator.get_state()}

    def set_state(self, state: dict) -> None:
        if "position" not in state:  # another pipeline's position, or one saved before positions held their identity
            self._iterator.set_state(state)
            return
        check_identity(state, self._identity, _POSITION_SETTINGS)
        self._iterator.set_state(state["position"])


class SFTTrainer(_PosttrainMixin, Trainer):
    """Pretraining's step on SFT batches: the loss is the mean over assistant tokens of the global batch."""

    kind = "sft"

    def __init__(self, config: Config):
        super().__init__(config)
        self._setup_posttrain(config)
        p, t = config.posttrain, config.train
        self.examples, self.stats = sft_data.prepare_sft(self.train_file, self.template_tokens, t.seq_len,
                                                         p.truncation)
        self.eval_examples, self.eval_stats = (None, None)
        if self.eval_file:
            self.eval_examples, self.eval_stats = sft_data.prepare_sft(self.eval_file, self.template_tokens,
                                                                       t.seq_len, p.truncation)

    def _dataset(self, examples, repeat: bool):
        p, t = self.config.posttrain, self.config.train
        return sft_data.sft_dataset(examples, seq_len=t.seq_len, batch_size=self.local_rows, seed=t.seed,
                                    pack=p.pack, packing_bins=p.packing_bins, repeat=repeat,
                                    shard_index=self.row_shard, shard_count=self.row_shards)

    def train_iterator(self):
        p, t = self.config.posttrain, self.config.train
        return CheckedPosition(iter(self._dataset(self.examples, repeat=True)), {
            "kind": "sft", "seed": t.seed, "seq_len": t.seq_len, "global_batch_size": t.global_batch_size,
            "examples": examples_digest(self.examples), "pack": p.pack, "packing_bins": p.packing_bins})

    def _empty_batch(self) -> dict:
        seq = self.config.train.seq_len
        return {k: np.zeros((self.local_rows, seq), np.int32) for k in (*sft_data.FEATURES, "positions",
                                                                        "segment_ids")}

    def evaluate(self, params) -> float:
        """Mean NLL per assistant token over the first ``train.eval_batches`` batches of the eval file (the train
        file when there is none), in file order."""
        total, count = 0.0, 0.0
        batches = self._dataset(self.eval_examples or self.examples, repeat=False)
        with self._sharding_context():
            for local_batch in self._agreed_batches(batches, self.config.train.eval_batches):
                loss_sum, n = self._eval_step(params, self.global_batch(local_batch))
                total, count = total + float(loss_sum), count + float(n)
        return total / max(count, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# DPO


class DPOTrainer(_PosttrainMixin, Trainer):
    """The DPO step on (chosen, rejected) rows; ``train.global_batch_size`` counts sequences (2 per pair)."""

    kind = "dpo"
    keeps_initial_params = True  # the reference: every step (reference=model) or until the precomputing pass

    def __init__(self, config: Config):
        t = config.train
        if t.global_batch_size % 2 or (t.global_batch_size // t.grad_accum_steps) % 2:
            raise ConfigError(f"DPO: train.global_batch_size ({t.global_batch_size}) counts sequences, two per pair; "
                              f"it and its micro-batches (/ train.grad_accum_steps) must be even")
        super().__init__(config)
        if (t.global_batch_size // self.row_shards) % 2:
            raise ConfigError(f"DPO: train.global_batch_size ({t.global_batch_size}) counts sequences, two per pair; "
                              f"each of the {self.row_shards} blocks of rows the processes build must be even")
        self._setup_posttrain(config)
        p = config.posttrain
        self.pairs, self.stats = dpo_data.prepare_dpo(self.train_file, self.template_tokens, t.seq_len, p.truncation)
        self.eval_pairs, self.eval_stats = (None, None)
        if self.eval_file:
            self.eval_pairs, self.eval_stats = dpo_data.prepare_dpo(self.eval_file, self.template_tokens, t.seq_len,
                                                                    p.truncation)
        params_sharding = self.state_sharding.params
        with self._sharding_context():
            self._train_step = self.build_train_step(
                make_dpo_gradients(p, config.model, t.grad_accum_steps, self.graphdef))
            self._dpo_eval = jax.jit(make_dpo_eval(p, config.model, self.graphdef),
                                     in_shardings=(params_sharding, self.batch_sharding))
            self._token_logps = jax.jit(
                lambda params, batch: token_logps(params, self.graphdef, batch, impl=config.model.cross_entropy_impl),
                in_shardings=(params_sharding, self.batch_sharding), out_shardings=self.batch_sharding)
        self._precomputed = False
        self.last_eval: dict = {}

    # Reference log-probs -------------------------------------------------------------------------------------
    def reference_logps(self, global_batch: dict):
        with self._sharding_context():
            return self._token_logps(self.initial_params(), global_batch)

    def precompute_reference(self) -> None:
        """One pass of the reference (the starting weights) over the train and eval pairs this process's shard
        holds (``dpo_dataset``'s ``pairs[row_shard::row_shards]``); stored in the pairs. Every process makes as many
        calls as the largest shard needs, the others padding with empty rows."""
        if self._precomputed:
            return
        per_call, start = self.local_rows // 2, self.row_shard * self.local_rows
        for pairs in (self.pairs, self.eval_pairs or []):
            mine = pairs[self.row_shard::self.row_shards]
            calls = -(-len(pairs[::self.row_shards]) // per_call)  # shard 0 is the largest
            for first in range(0, calls * per_call, per_call):
                chunk = mine[first:first + per_call]
                batch = self._pairs_batch(chunk) if chunk else self._empty_batch()
                logps = process_local_rows(self.reference_logps(self.global_batch(batch)), start,
                                           start + self.local_rows)
                for i, pair in enumerate(chunk):
                    pair["chosen"]["ref_logps"] = logps[2 * i].astype(np.float32)
                    pair["rejected"]["ref_logps"] = logps[2 * i + 1].astype(np.float32)
        self._precomputed = True

    def _pairs_batch(self, chunk: list[dict]) -> dict:
        """Rows of ``chunk`` (chosen even, rejected odd), padded to this process's rows."""
        return self._pad_rows(dpo_data.interleave({side: {k: np.stack([p[side][k] for p in chunk])
                                                          for k in chunk[0][side]}
                                                   for side in ("chosen", "rejected")}))

    def _empty_batch(self) -> dict:
        seq = self.config.train.seq_len
        return {**{k: np.zeros((self.local_rows, seq), np.int32) for k in dpo_data.ROW_FEATURES},
                "ref_logps": np.zeros((self.local_rows, seq), np.float32)}

    def step_batch(self, local_batch: dict) -> dict:
        batch = self.global_batch(local_batch)
        if self.config.posttrain.reference == "model":
            batch = {**batch, "ref_logps": self.reference_logps(batch)}
        return batch

    # Trainer hooks -------------------------------------------------------------------------------------------
    def _dataset(self, pairs, repeat: bool):
        t = self.config.train
        return dpo_data.dpo_dataset(pairs, pairs_per_batch=self.local_rows // 2, seed=t.seed, repeat=repeat,
                                    shard_index=self.row_shard, shard_count=self.row_shards)

    def train_iterator(self):
        if self.config.posttrain.reference == "precomputed":
            self.precompute_reference()
            self._initial = None  # the loop has built its state by now: the reference weights are not needed
        t = self.config.train
        return CheckedPosition(iter(self._dataset(self.pairs, repeat=True)), {
            "kind": "dpo", "seed": t.seed, "seq_len": t.seq_len, "global_batch_size": t.global_batch_size,
            "examples": examples_digest(self.pairs)})

    def evaluate_pairs(self, params, pairs=None, max_batches: int | None = None) -> dict:
        """DPO loss, reward accuracy / margin, chosen / rejected rewards and KL proxy over ``pairs`` (default: the
        eval pairs, else the train pairs), all of them or their first ``max_batches`` batches."""
        if self.config.posttrain.reference == "precomputed":
            self.precompute_reference()
        pairs = pairs if pairs is not None else (self.eval_pairs or self.pairs)
        loss_sum, sums = 0.0, {}
        with self._sharding_context():
            for local_batch in self._agreed_batches(self._dataset(pairs, repeat=False), max_batches):
                batch = self.step_batch(local_batch)
                loss, stats = jax.device_get(self._dpo_eval(params, batch))
                loss_sum += float(loss)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        n = max(sums.get("pairs", 0.0), 1.0)
        return {"loss": loss_sum / n, **{k: v / n for k, v in sums.items() if k not in ("pairs", "tokens")},
                "pairs": sums.get("pairs", 0.0)}

    def evaluate(self, params) -> float:
        """The loop's periodic eval: DPO loss over the first ``train.eval_batches`` batches of eval pairs (the
        other metrics are kept in ``last_eval`` and logged with it, ``last_eval_metrics``)."""
        self.last_eval = self.evaluate_pairs(params, max_batches=self.config.train.eval_batches)
        return self.last_eval["loss"]

    def last_eval_metrics(self) -> dict:
        return {f"eval_{name}": value for name, value in self.last_eval.items() if name not in ("loss", "pairs")}
