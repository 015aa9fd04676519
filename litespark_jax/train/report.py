"""What the CLI prints around a run: a header saying what will run, and a summary of what happened."""

from __future__ import annotations

import jax

from litespark_jax import data as data_lib
from litespark_jax.config import Config
from litespark_jax.train.loop import TrainResult, train
from litespark_jax.train.run_dir import make_run_dir


def train_and_report(config: Config) -> TrainResult:
    m, t = config.model, config.train
    main_process = jax.process_index() == 0
    if main_process:
        make_run_dir(config)
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
                         f"({abs(entropy - eval_loss):.4f} {'below' if eval_loss < entropy else 'ABOVE'} it)")
        if throughput:
            lines.append(f"throughput {sum(throughput) / len(throughput):,.0f} tokens/s")
        if lines:
            print("\n".join(lines), flush=True)
    return result
