"""The training loop: builds everything from a Config, runs jitted steps, evaluates, reports.

Data flows one way: config -> mesh -> sharded state -> data iterator -> jitted step -> metrics. Logging and the
progress bar live here; the step itself (``step.py``) is pure.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Callable

import jax
from tqdm import tqdm

import pallas_kernels
from litespark_jax import data as data_lib
from litespark_jax import trace_summary
from litespark_jax.checkpoint import data_position
from litespark_jax.data.global_batch import process_row_shard, to_global_arrays
from litespark_jax.checkpoint.preemption import PreemptionHandler, jax_preemption_service
from litespark_jax.checkpoint.session import RunCheckpoints
from litespark_jax.config import Config
from litespark_jax.energy import EnergyWindow
from litespark_jax.errors import CheckpointError, ConfigError, UserError
from litespark_jax.metrics import MetricsWriter, mfu, model_flops_per_token, peak_tflops_per_device
from litespark_jax.parallel.logical import use_rules
from litespark_jax.parallel.mesh import DEFAULT_RULES, batch_sharding, build_mesh, check_shapes
from litespark_jax.parallel.watchdog import StepWatchdog
from litespark_jax.train.guards import Guards
from litespark_jax.train.offload import build_train_step
from litespark_jax.train.optimizer import build_optimizer, learning_rate_schedule
from litespark_jax.train.run_dir import record_config
from litespark_jax.train.state import TrainState, abstract_model, init_train_state, state_shardings
from litespark_jax.train.step import compiler_options, make_eval_step, make_gradients

log = logging.getLogger("litespark_jax")


@dataclasses.dataclass
class TrainResult:
    """What a finished run reports (also returned to notebooks)."""

    state: TrainState
    history: list[dict]
    """One dict per logged step: step, loss, grad_norm, tokens_per_second, mfu, ..."""
    eval_history: list[dict]
    """One dict per evaluation: step, eval_loss (DPO adds eval_reward_accuracy, eval_reward_margin, ...)."""
    unigram_entropy: float | None = None


class Trainer:
    """Owns the mesh, the sharded state, the jitted steps and the data iterators of one run."""

    def __init__(self, config: Config):
        self.config = config
        self.mesh = build_mesh(config.mesh)
        self.rules = DEFAULT_RULES
        check_shapes(config, self.mesh, self.rules)
        self.watchdog = StepWatchdog.from_env()  # exits non-zero when a step hangs (LITESPARK_STEP_TIMEOUT_S)
        self.tokenizer = data_lib.build_tokenizer(config.data)
        if self.tokenizer.vocab_size > config.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size ({config.model.vocab_size}) is smaller than the tokenizer's vocabulary "
                f"({self.tokenizer.vocab_size}, {self.tokenizer.name})"
            )
        t = config.train
        self.optimizer = build_optimizer(config.optim, t.steps)
        self.schedule = learning_rate_schedule(config.optim, t.steps)
        self.graphdef, abstract_params = abstract_model(config.model)
        self.state_sharding = state_shardings(self.optimizer, abstract_params, self.mesh, self.rules,
                                              config.optim.offload_state)
        params_sharding = self.state_sharding.params
        self.batch_sharding = batch_sharding(self.mesh, self.rules)
        # Which rows of each global batch this process builds (processes that hold the same rows build the same).
        self.row_shard, self.row_shards = process_row_shard(self.batch_sharding, t.global_batch_size)
        self.compiler_options = compiler_options(config)  # checked once; subclasses' steps reuse it
        n_tuned = pallas_kernels.use_table(config.model.kernel_table)  # None: a table an earlier run loaded goes
        if config.model.kernel_table:
            log.info("kernel table %s: %d tuned calls apply on this device", config.model.kernel_table, n_tuned)
        with self._sharding_context():
            self._train_step = self.build_train_step(make_gradients(config, self.graphdef))
            self._eval_step = jax.jit(make_eval_step(config, self.graphdef),
                                      in_shardings=(params_sharding, self.batch_sharding))
        self.flops_per_token = model_flops_per_token(config.model, t.seq_len, causal=True)
        self.peak_tflops = peak_tflops_per_device(t.peak_tflops_per_device)

    def build_train_step(self, gradients) -> Callable:
        """``offload.build_train_step`` with this trainer's optimizer, schedule, shardings and XLA options."""
        return build_train_step(self.config, gradients, self.optimizer, self.schedule, self.state_sharding,
                                self.batch_sharding, self.compiler_options)

    def _sharding_context(self):
        return use_rules(self.mesh, self.rules)

    def restore_state(self, manager, step: int | None = None):
        """``manager.restore`` of a TrainState laid out on this trainer's mesh (``step`` None: the newest good one).

        The target is the random-init state traced without allocating (``Trainer.init_state``, never a subclass's,
        which may load starting weights; the shapes are the same), so a checkpoint saved on another device count or
        mesh restores onto this one."""
        from litespark_jax.checkpoint.manager import abstract_with_shardings

        with self._sharding_context():
            target = abstract_with_shardings(jax.eval_shape(lambda: Trainer.init_state(self)), self.state_sharding)
            return manager.restore(target, step)

    def init_state(self) -> TrainState:
        init = functools.partial(init_train_state, self.config.model, self.optimizer, self.config.train.seed)
        with self._sharding_context():
            return jax.jit(init, out_shardings=self.state_sharding)()

    def train_iterator(self):
        t = self.config.train
        return data_lib.make_train_iterator(self.config.data, self.tokenizer, seq_len=t.seq_len,
                                            global_batch_size=t.global_batch_size, seed=t.seed,
                                            process_index=self.row_shard, process_count=self.row_shards)

    def global_batch(self, local_batch: dict) -> dict:
        return to_global_arrays(local_batch, self.batch_sharding, self.config.train.global_batch_size)

    def step_batch(self, local_batch: dict) -> dict:
        """What the jitted train step takes: the global batch (DPO adds the reference log-probs)."""
        return self.global_batch(local_batch)

    def train_step(self, state: TrainState, local_batch: dict):
        with self._sharding_context():
            out = self._train_step(state, self.step_batch(local_batch))
        self.watchdog.beat()
        return out

    def check_eval_data(self) -> None:
        """Fail before training, not after it, when the evaluation data cannot be read."""
        data_lib.check_validation_split(self.config.data, self.tokenizer)

    def last_eval_metrics(self) -> dict:
        """Metrics of the last ``evaluate`` besides its loss, logged with it as ``eval_<name>`` (DPO's rewards)."""
        return {}

    def evaluate(self, params) -> float:
        """Mean NLL per token over ``train.eval_batches`` validation batches."""
        t = self.config.train
        iterator = data_lib.make_eval_iterator(self.config.data, self.tokenizer, seq_len=t.seq_len,
                                               global_batch_size=t.global_batch_size, max_batches=t.eval_batches,
                                               process_index=self.row_shard, process_count=self.row_shards)
        total, count = 0.0, 0.0
        with self._sharding_context():
            for local_batch in iterator:
                loss_sum, n = self._eval_step(params, self.global_batch(local_batch))
                total, count = total + float(loss_sum), count + float(n)
        return total / max(count, 1.0)


def train(config: Config, *, callback: Callable[[int, dict], None] | None = None,
          trainer: Trainer | None = None) -> TrainResult:
    """Run ``config.train.steps`` optimizer steps and return the final state and the metric history.

    ``trainer``: a ready ``Trainer`` (or subclass with its own data, init and step, e.g. post-training's
    ``SFTTrainer``/``DPOTrainer``) built from ``config``; None builds the pretraining one."""
    trainer = trainer if trainer is not None else Trainer(config)
    t, lc = config.train, config.log
    checkpoints = RunCheckpoints(trainer)
    try:
        state, data_state, start_step = checkpoints.restore_or_init()
        if start_step < t.steps:
            trainer.check_eval_data()
        iterator = trainer.train_iterator()
        if data_state is not None and t.resume_data:
            own = data_position.own(data_state, trainer.row_shard, trainer.row_shards, checkpoints.restored_from)
            _restore_data_position(iterator, own, checkpoints.restored_from)
    except BaseException:
        checkpoints.close()  # releases the directory's lock: a refused start leaves the directory as it was
        raise
    if jax.process_index() == 0:
        if checkpoints.restored_from:
            print(f"resumed from {checkpoints.restored_from} (step {start_step})", flush=True)
            if data_state is not None and not t.resume_data:
                print("train.resume_data=false: the data stream starts afresh", flush=True)
        if start_step >= t.steps:
            print(f"nothing to train: the run's checkpoint is at step {start_step} and train.steps is {t.steps} "
                  "(raise train.steps to train further)", flush=True)
        else:
            record_config(config)
    writer = MetricsWriter(t.run_dir, jsonl=lc.jsonl, tensorboard=lc.tensorboard, start_step=start_step)
    history, eval_history = [], []
    tokens_per_step = t.global_batch_size * t.seq_len
    bar = tqdm(total=t.steps, initial=start_step, desc="train", unit="step",
               disable=not lc.progress_bar or jax.process_index() != 0 or start_step >= t.steps, dynamic_ncols=True)
    interval_start, interval_steps, step = None, 0, start_step
    energy = EnergyWindow(clock_interval_s=0.5)
    guards = Guards(t, checkpoints)
    agreed_preemption = jax_preemption_service()
    if jax.process_count() > 1 and not agreed_preemption:
        log.warning("JAX's preemption service is off (jax_enable_preemption_service): a SIGTERM that reaches only "
                    "some of the processes stops those alone and the others wait for them")
    preemption = PreemptionHandler(agreed=agreed_preemption).__enter__()

    def preempted_at(step: int) -> bool:
        # Asked once every step, as JAX's preemption service requires; one process's own flag would stop it alone.
        return checkpoints.preemption_reached(step) if agreed_preemption else preemption.requested

    profiler = StepProfiler(lc, t.run_dir)
    try:
        while step < t.steps:  # not a for loop: a spike rollback moves `step` back to its checkpoint
            step += 1
            profiler.before(step)
            state, metrics = trainer.train_step(state, next(iterator))
            profiler.after(step, metrics, bar.write)
            guards.observe(step, metrics)
            interval_steps += 1
            if interval_start is None:
                # The first step includes compilation; throughput is measured from its end.
                jax.block_until_ready(metrics["loss"])
                interval_start, interval_steps = time.perf_counter(), 0
                energy.start()
            if step % lc.every == 0 or step == t.steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - interval_start
                if interval_steps:
                    tps = interval_steps * tokens_per_step / elapsed
                    metrics["tokens_per_second"] = tps
                    metrics["mfu"] = mfu(tps, trainer.flops_per_token, trainer.peak_tflops, jax.device_count())
                    joules, watts = energy.stop()
                    if joules is not None:  # this host's GPUs: power per GPU, energy per token they processed
                        metrics["power_w"] = watts / energy.meter.device_count
                        local_tokens = interval_steps * tokens_per_step * jax.local_device_count() / jax.device_count()
                        metrics["joules_per_token"] = joules / local_tokens
                    if energy.sm_clock_mhz is not None:  # median SM clock; share of it held down by the power limit
                        metrics["sm_clock_mhz"], metrics["power_capped"] = energy.sm_clock_mhz, energy.power_capped
                interval_start, interval_steps = time.perf_counter(), 0
                energy.start()
                skipped = guards.check_nonfinite(step, metrics)  # on_nonfinite=stop raises NumericalError here
                if "nonfinite" in metrics:
                    metrics["nonfinite_skipped"] = float(skipped)
                spike = guards.is_spike(step, metrics["loss"])
                if guards.spikes or guards.rollbacks:
                    metrics.update(spikes=float(guards.spikes), rollbacks=float(guards.rollbacks))
                history.append({"step": step, **metrics})
                writer.write(step, metrics)
                bar.set_postfix_str(_postfix(metrics), refresh=False)
                if callback:
                    callback(step, metrics)
                if spike and t.on_spike == "rollback":
                    # This step is the one the preemption check below would ask about; asked after the rollback,
                    # an agreed preemption step would be met only once the rolled-back steps were retrained.
                    if preempted_at(step):
                        bar.write(f"preempted at a loss spike (step {step}): not saved; a resumed run starts from "
                                  f"the last checkpoint, before the spike")
                        break
                    rolled_back = guards.rollback(step, trainer)
                    if rolled_back is not None:
                        state, step = rolled_back
                        bar.n = step
                        interval_start = None
                        continue
            bar.update(1)
            # Save before evaluating: the (asynchronous) write overlaps the evaluation, and an evaluation that
            # fails cannot cost the step's checkpoint.
            preempted = preempted_at(step)
            if checkpoints.should_save(step) or preempted:
                guards.check_nonfinite(step)  # on_nonfinite=stop: stop before saving past a bad step
                checkpoints.save(step, state, iterator)
            if preempted:
                bar.write(f"preempted: saved step {step} to {checkpoints.directory}; exiting")
                break
            if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                eval_loss = trainer.evaluate(state.params)
                evaluated = {"eval_loss": eval_loss, **trainer.last_eval_metrics()}
                eval_history.append({"step": step, **evaluated})
                writer.write(step, evaluated)
                bar.write(f"step {step}: eval loss {eval_loss:.4f}")
    finally:
        energy.stop()  # ends the clock sampler's thread
        profiler.close()
        preemption.__exit__()
        trainer.watchdog.stop()
        bar.close()
        writer.close()
        checkpoints.close()
    return TrainResult(state=state, history=history, eval_history=eval_history)


def _restore_data_position(iterator, data_state: dict, source: str | None) -> None:
    """``iterator.set_state``; a position another kind of pipeline saved (e.g. pretraining's, resumed by SFT) is a
    one-line error instead of grain's KeyError."""
    try:
        iterator.set_state(data_state)
    except UserError:
        raise
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise CheckpointError(
            f"the data position in {source} does not fit this run's data pipeline ({type(e).__name__}: "
            f"{str(e)[:100]}): it was saved by another kind of run or data setup. Start from its weights with "
            f"posttrain.init_from, or keep the state and start the data afresh with train.resume_data=false") from None


class StepProfiler:
    """Traces steps ``log.profile_start`` .. ``+ log.profile_steps - 1`` with ``jax.profiler`` into RUN_DIR/profile
    (per process) and prints the summary of ``litespark_jax.trace_summary`` when the window closes."""

    def __init__(self, cfg, run_dir: str):
        self.first = cfg.profile_start
        self.last = cfg.profile_start + cfg.profile_steps - 1
        self.directory = os.path.join(run_dir, "profile", f"process_{jax.process_index()}")
        self.tracing = False

    def before(self, step: int) -> None:
        if self.first and step == self.first and not self.tracing:
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self.tracing = True

    def after(self, step: int, metrics: dict, write: Callable[[str], None]) -> None:
        if not self.tracing or step < self.last:
            return
        jax.block_until_ready(metrics)
        self.close()
        summary = trace_summary.summarize_trace(self.directory, self.last - self.first + 1)
        if jax.process_index() == 0:
            write(f"profile of steps {self.first}-{self.last} ({self.directory}):\n"
                  f"{trace_summary.format_summary(summary)}")

    def close(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False


def _postfix(metrics: dict) -> str:
    parts = [f"loss {metrics['loss']:.3f}"]
    if "tokens_per_second" in metrics:
        parts.append(f"{metrics['tokens_per_second']:,.0f} tok/s")
    if metrics.get("mfu") is not None:
        parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    if metrics.get("power_w") is not None:
        parts.append(f"{metrics['power_w']:.0f} W/GPU, {metrics['joules_per_token']:.3f} J/tok")
    if metrics.get("sm_clock_mhz") is not None:
        parts.append(f"{metrics['sm_clock_mhz']:.0f} MHz ({100 * metrics['power_capped']:.0f}% power-capped)")
    return " | ".join(parts)
