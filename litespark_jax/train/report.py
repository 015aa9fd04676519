"""What the CLI prints around a run: a header saying what will run, and a summary of what happened."""

from __future__ import annotations

import os

import jax
import yaml

from litespark_jax import data as data_lib
from litespark_jax.config import Config
from litespark_jax.errors import ConfigError
from litespark_jax.train.loop import TrainResult, train


def write_run_dir(config: Config) -> None:
    """Create ``train.run_dir`` (ConfigError when it cannot be a directory) and write the run's config.yaml there.

    A config.yaml that an earlier run left and that differs from this one is kept as config.N.yaml (the lowest free
    N) rather than overwritten: a resumed run may change its config on purpose (more steps), or by mistake, in
    which case the checkpoint's restore fails and the run dir must still say what made it."""
    run_dir = config.train.run_dir
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:  # a file in the way, no permission, read-only file system
        raise ConfigError(f"train.run_dir {run_dir} cannot be used as a directory: {e.strerror or e}") from None
    path = os.path.join(run_dir, "config.yaml")
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
        n = 1
        while os.path.exists(os.path.join(run_dir, f"config.{n}.yaml")):
            n += 1
        os.replace(path, os.path.join(run_dir, f"config.{n}.yaml"))
    with open(path, "w") as f:
        f.write(text)


def train_and_report(config: Config) -> TrainResult:
    m, t = config.model, config.train
    main_process = jax.process_index() == 0
    if main_process:
        write_run_dir(config)
        print(
            f"model: {m.num_params() / 1e6:.2f}M params, {m.num_layers} layers, d_model {m.d_model}, "
            f"{m.num_heads} heads / {m.num_kv_heads} kv heads, dtype {m.dtype}\n"
            f"train: {t.steps} steps x {t.global_batch_size} x {t.seq_len} tokens on {jax.device_count()} "
            f"{jax.devices()[0].platform} device(s); run dir {t.run_dir}",
            flush=True,
        )
    result = train(config)
    if main_process:
        entropy = data_lib.unigram_entropy(config.data, data_lib.build_tokenizer(config.data))
        result.unigram_entropy = entropy
        final = result.history[-1] if result.history else {}
        throughput = [h["tokens_per_second"] for h in result.history if "tokens_per_second" in h]
        lines = []  # none for a resumed run that had no step left to take
        if "loss" in final:
            lines.append(f"final train loss {final['loss']:.4f}")
        if result.eval_history:
            eval_loss = result.eval_history[-1]["eval_loss"]
            lines.append(f"validation loss {eval_loss:.4f} nats/token vs unigram entropy {entropy:.4f} nats/token "
                         f"({'below' if eval_loss < entropy else 'NOT below'} by {entropy - eval_loss:.4f})")
        if throughput:
            lines.append(f"throughput {sum(throughput) / len(throughput):,.0f} tokens/s")
        if lines:
            print("\n".join(lines), flush=True)
    return result
