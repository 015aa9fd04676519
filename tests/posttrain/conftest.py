"""Shared pieces of the post-training tests: a tiny Llama config on the byte tokenizer and JSONL writers."""

import json

import pytest

from litespark_jax.config import from_dict


def tiny_config(seq_len=64, **sections):
    raw = {
        "model": {"vocab_size": 272, "d_model": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "d_ff": 64,
                  "max_seq_len": 512},
        "train": {"steps": 4, "global_batch_size": 4, "seq_len": seq_len, "eval_every": 0, "eval_batches": 1,
                  "seed": 0},
        "optim": {"learning_rate": 1e-3, "warmup_steps": 0, "weight_decay": 0.0},
        "log": {"every": 1, "progress_bar": False, "tensorboard": False},
        "mesh": {"fsdp": 1, "data": -1},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return from_dict(raw)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


@pytest.fixture
def jsonl(tmp_path):
    counter = iter(range(1000))
    return lambda rows: write_jsonl(tmp_path / f"data{next(counter)}.jsonl", rows)
