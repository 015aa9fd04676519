"""Bad-input suite: each case runs a real CLI in a subprocess with one bad input (config, CLI flag, data file,
tokenizer, checkpoint, Hugging Face directory, storage) and must give exit code 2, exactly one `error: ...` line
naming what is wrong and where, no traceback, and leave every checkpoint already saved byte for byte unchanged.

Most cases fail before any compilation, so the suite stays fast; the shared checkpoint is written once per worker.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.checkpoint.conftest import TINY, subprocess_env

TRAIN, CONVERT, PREPARE, TOKENIZER, GENERATE = (f"litespark_jax.{m}" for m in
                                                ("train", "convert", "prepare", "tokenizer", "generate"))
TRAIN_ARGS = TINY + ["train.steps=2"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A finalized two-step checkpoint of the tiny config, shared (read-only) by the cases."""
    import jax.numpy as jnp

    from litespark_jax.checkpoint.manager import CheckpointManager
    from litespark_jax.config import CheckpointConfig, load_config
    from litespark_jax.train.optimizer import build_optimizer
    from litespark_jax.train.state import init_train_state

    root = tmp_path_factory.mktemp("saved")
    config = load_config(None, TRAIN_ARGS + [f"train.run_dir={root / 'run'}"])
    optimizer = build_optimizer(config.optim, config.train.steps)
    state = init_train_state(config.model, optimizer, 0)
    manager = CheckpointManager(str(root / "run" / "checkpoints"), CheckpointConfig(async_save=False))
    for step in (1, 2):
        state.step = jnp.asarray(step, jnp.int32)
        manager.save(step, state, data_state=None, config=config.to_dict())
    manager.close()
    from litespark_jax.train.run_dir import record_config

    record_config(config)  # the run's config.yaml, as a run that trained writes it
    return root / "run"


def tree_hash(path) -> str:
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(path)):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            digest.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def write(path, content, mode="w"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode) as f:
        f.write(content)
    return str(path)


def corpus(tmp, name, lines):
    import zstandard

    path = tmp / "data" / name
    os.makedirs(path.parent, exist_ok=True)
    raw = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(raw) if name.endswith(".zst") else raw)
    return str(path)


def truncated_zst(tmp):
    full = corpus(tmp, "full.jsonl.zst", [json.dumps({"text": os.urandom(600).hex()}) for _ in range(20)])
    data = open(full, "rb").read()
    return data[: len(data) // 2]


def copy_checkpoints(saved, tmp):
    target = tmp / "copy"
    shutil.copytree(saved, target)
    return target


def hf_dir(tmp, config=None, raw=None):
    path = tmp / "hf"
    path.mkdir(exist_ok=True)
    if raw is not None:
        (path / "config.json").write_text(raw)
    elif config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return str(path)


LLAMA_HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}


def _damage_all(copy):
    """Truncate every file of every step's arrays: nothing is left to fall back to."""
    for step in os.listdir(copy / "checkpoints"):
        for dirpath, _, files in os.walk(copy / "checkpoints" / step / "state"):
            for name in files:
                open(os.path.join(dirpath, name), "wb").close()


# Each case: (id, module, build(tmp, saved) -> argv, regex the error line must match). `saved` is a finished
# run directory; `tmp` is this case's own directory.
CASES = [
    # -- configs and CLI flags (train) --
    ("config-missing", TRAIN, lambda t, s: ["--config", str(t / "nope.yaml")], r"config file '.*nope\.yaml' does not exist"),
    ("config-bad-yaml", TRAIN, lambda t, s: ["--config", write(t / "c.yaml", "model: {d_model: [1,\n")],
     r"c\.yaml: not valid YAML"),
    ("config-not-mapping", TRAIN, lambda t, s: ["--config", write(t / "c.yaml", "- 1\n- 2\n")],
     r"c\.yaml: the top level must be a mapping"),
    ("config-unknown-section", TRAIN, lambda t, s: ["--config", write(t / "c.yaml", "modle: {d_model: 8}\n")],
     r"c\.yaml: unknown section 'modle' \(did you mean 'model'\?\)"),
    ("config-wrong-type-in-file", TRAIN, lambda t, s: ["--config", write(t / "c.yaml", "train: {steps: many}\n")],
     r"c\.yaml: 'train\.steps' must be int, got 'many'"),
    ("override-unknown-key", TRAIN, lambda t, s: ["model.num_head=8"], r"unknown key 'model\.num_head' \(did you mean"),
    ("override-no-equals", TRAIN, lambda t, s: ["train.steps"], r"override 'train\.steps' must look like section\.key=value"),
    ("override-bad-key-shape", TRAIN, lambda t, s: ["steps=3"], r"override 'steps=3': the key must be section\.key"),
    ("override-wrong-type", TRAIN, lambda t, s: ["train.steps=ten"], r"'train\.steps' must be int, got 'ten'"),
    ("heads-not-dividing", TRAIN, lambda t, s: ["model.num_heads=7"], r"model\.num_heads \(7\) must divide model\.d_model"),
    ("zero-steps", TRAIN, lambda t, s: ["train.steps=0"], r"train\.steps must be positive, got 0"),
    ("seq-longer-than-model", TRAIN, lambda t, s: ["train.seq_len=4096"], r"train\.seq_len \(4096\) is longer than model\.max_seq_len"),
    ("bad-dtype", TRAIN, lambda t, s: ["model.dtype=float8"], r"model\.dtype must be one of"),
    ("keep-last-zero", TRAIN, lambda t, s: ["checkpoint.keep_last=0"], r"checkpoint\.keep_last must be at least 1"),
    ("bad-guard-mode", TRAIN, lambda t, s: ["train.on_nonfinite=ignore"], r"train\.on_nonfinite must be stop or skip"),
    ("mesh-two-fills", TRAIN, lambda t, s: ["mesh.data=-1", "mesh.fsdp=-1"], r"at most one mesh axis may be -1"),
    ("vocab-smaller-than-tokenizer", TRAIN, lambda t, s: TRAIN_ARGS + ["model.vocab_size=100", f"train.run_dir={t / 'r'}"],
     r"model\.vocab_size \(100\) is smaller than the tokenizer's vocabulary"),
    # -- data files and tokenizers --
    ("train-glob-empty", TRAIN, lambda t, s: TRAIN_ARGS + [f"data.train_files={t / 'none' / '*.jsonl'}", f"train.run_dir={t / 'r'}"],
     r"data\.train_files: glob '.*none/\*\.jsonl' matches no files"),
    ("train-bad-json-line", TRAIN, lambda t, s: TRAIN_ARGS + [
        f"data.train_files={corpus(t, 'a.jsonl', [json.dumps({'text': 'ok ' * 50}), '{not json'])}",
        f"train.run_dir={t / 'r'}"], r"a\.jsonl:2: malformed JSON"),
    ("train-truncated-zst", TRAIN, lambda t, s: TRAIN_ARGS + [
        f"data.train_files={write(t / 'd' / 'b.jsonl.zst', truncated_zst(t), 'wb')}",
        f"train.run_dir={t / 'r'}"], r"b\.jsonl\.zst: truncated \.zst file"),
    ("tokenizer-missing", TRAIN, lambda t, s: TRAIN_ARGS + [f"data.tokenizer={t / 'tok.json'}", f"train.run_dir={t / 'r'}"],
     r"data\.tokenizer: '.*tok\.json' is not 'byte' and no such file exists"),
    ("tokenizer-garbage", TRAIN, lambda t, s: TRAIN_ARGS + [f"data.tokenizer={write(t / 'tok.json', '{garbage')}",
                                                           f"train.run_dir={t / 'r'}"],
     r"data\.tokenizer: cannot load .*tok\.json as a Hugging Face tokenizer\.json"),
    ("prepare-glob-empty", PREPARE, lambda t, s: ["--files", str(t / "none" / "*.jsonl"), "--out", str(t / "out")],
     r"--files: glob '.*none/\*\.jsonl' matches no files"),
    ("prepare-bad-tokenizer", PREPARE, lambda t, s: ["--files", corpus(t, "a.jsonl", [json.dumps({"text": "hi"})]),
                                                     "--tokenizer", str(t / "tok.json"), "--out", str(t / "out")],
     r"'.*tok\.json' is not 'byte' and no such file exists"),
    ("tokenizer-train-glob-empty", TOKENIZER, lambda t, s: ["train", "--files", str(t / "none" / "*.jsonl"), "--out",
                                                            str(t / "tok")], r"--files: glob '.*none/\*\.jsonl' matches no files"),
    # -- checkpoints --
    ("resume-missing-dir", TRAIN, lambda t, s: TRAIN_ARGS + [f"train.resume={t / 'gone'}", f"train.run_dir={t / 'r'}"],
     r"checkpoint directory .*gone does not exist"),
    ("resume-not-a-checkpoint", TRAIN, lambda t, s: TRAIN_ARGS + [f"train.resume={t}", f"train.run_dir={t / 'r'}"],
     r"is not a checkpoint directory"),
    ("resume-shape-mismatch", TRAIN, lambda t, s: TRAIN_ARGS + ["model.d_ff=48", f"train.resume={s / 'checkpoints'}",
                                                               f"train.run_dir={t / 'r'}"],
     r"parameter 'params\.layers\.mlp\.w_down' has shape \(2, 64, 32\) but the config needs \(2, 48, 32\)"),
    ("resume-never-into-used-dir", TRAIN, lambda t, s: TRAIN_ARGS + ["train.resume=never", f"train.run_dir={s}"],
     r"train\.resume=never but .*already holds checkpoints \[1, 2\]"),
    ("resume-all-corrupted", TRAIN, lambda t, s: TRAIN_ARGS + [
        f"train.run_dir={(lambda c: (_damage_all(c), c)[1])(copy_checkpoints(s, t))}"],
     r"no readable checkpoint in .*copy/checkpoints"),
    ("resume-missing-step", GENERATE, lambda t, s: ["--checkpoint", str(s / "checkpoints" / "9"), "--prompt", "x"],
     r"checkpoints/9 does not exist"),
    ("generate-not-a-checkpoint", GENERATE, lambda t, s: ["--checkpoint", str(t), "--prompt", "x"],
     r"is not a checkpoint directory"),
    ("generate-negative-tokens", GENERATE, lambda t, s: ["--checkpoint", str(s / "checkpoints"), "--prompt", "x",
                                                         "--max-new-tokens", "-1"], r"--max-new-tokens must be >= 0"),
    ("to-hf-not-a-checkpoint", CONVERT, lambda t, s: ["to-hf", "--checkpoint", str(t), "--out", str(t / "hf")],
     r"is not a checkpoint directory"),
    # -- Hugging Face directories --
    ("from-hf-missing-dir", CONVERT, lambda t, s: ["from-hf", "--hf-dir", str(t / "nope"), "--out", str(t / "c")],
     r"Hugging Face directory .*nope does not exist"),
    ("from-hf-empty-dir", CONVERT, lambda t, s: ["from-hf", "--hf-dir", hf_dir(t), "--out", str(t / "c")],
     r"not a Hugging Face model directory"),
    ("from-hf-bad-json", CONVERT, lambda t, s: ["from-hf", "--hf-dir", hf_dir(t, raw="{oops"), "--out", str(t / "c")],
     r"hf/config\.json: not valid JSON"),
    ("from-hf-not-llama", CONVERT, lambda t, s: ["from-hf", "--hf-dir", hf_dir(t, {**LLAMA_HF, "architectures": [
        "MistralForCausalLM"], "model_type": "mistral"}), "--out", str(t / "c")], r"unsupported architecture.*Mistral"),
    ("from-hf-no-weights", CONVERT, lambda t, s: ["from-hf", "--hf-dir", hf_dir(t, LLAMA_HF), "--out", str(t / "c")],
     r"hf has no model\.safetensors or model\.safetensors\.index\.json"),
    ("generate-hf-no-weights", GENERATE, lambda t, s: ["--hf-dir", hf_dir(t, LLAMA_HF), "--prompt", "x"],
     r"hf has no model\.safetensors or model\.safetensors\.index\.json"),
    # -- storage --
    ("checkpoint-dir-under-a-file", TRAIN, lambda t, s: TRAIN_ARGS + [
        f"checkpoint.dir={write(t / 'file', 'x')}/ckpt", f"train.run_dir={t / 'r'}"], r"checkpoint directory .*file/ckpt"),
    ("run-dir-is-a-file", TRAIN, lambda t, s: TRAIN_ARGS + [f"train.run_dir={write(t / 'file', 'x')}"],
     r"train\.run_dir .*/file cannot be used as a directory: File exists"),
    # -- compiler options --
    ("xla-option-unknown", TRAIN, lambda t, s: TRAIN_ARGS + ["train.xla_options={xla_gpu_enable_lhs: true}",
                                                          f"train.run_dir={t / 'r'}"],
     r"train\.xla_options: .*No such compile option: 'xla_gpu_enable_lhs'"),
]


@pytest.mark.parametrize("case_id, module, build, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_harms_nothing(tmp_path, saved, case_id, module, build, pattern):
    # The saved checkpoints, and the config that made them: a refused run leaves the run directory's config.yaml
    # (and any config.N.yaml) as they were.
    before = tree_hash(saved / "checkpoints")
    configs = lambda: {p.read_text() for p in saved.glob("config*.yaml")}
    saved_configs = configs()
    argv = build(tmp_path, saved)
    proc = subprocess.run([sys.executable, "-m", module, *argv], env=subprocess_env(), capture_output=True,
                          text=True, timeout=180, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-4000:]
    assert proc.returncode == 2, output[-4000:]
    print(f"{case_id}: {errors[0]}")
    assert re.search(pattern, errors[0]), errors[0]
    assert tree_hash(saved / "checkpoints") == before
    assert saved_configs and saved_configs == configs()


def test_the_suite_has_at_least_30_cases():
    assert len(CASES) >= 30
