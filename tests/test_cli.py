"""The command line: bad input is one line on stderr and exit code 2, never a traceback."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, cwd=ROOT, **env_vars):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **env_vars}
    return subprocess.run([sys.executable, "-m", "litespark_jax.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/missing.yaml"], "config file 'configs/missing.yaml' does not exist"),
    (["model.num_haeds=8"], "did you mean 'model.num_heads'?"),
    (["train.steps=ten"], "'train.steps' must be int"),
    (["model.num_heads=7"], "must divide model.d_model"),
    (["model.num_kv_heads=3"], "must divide model.num_heads"),
    (["train.seq_len=100000"], "is longer than model.max_seq_len"),
    (["model.vocab_size=100"], "model.vocab_size (100) is smaller than the tokenizer's vocabulary"),
    (["model.num_heads=7", "--config", "configs/tiny.yaml", "train.steps=2"], "must divide model.d_model"),
    # a mistake on the command line is blamed on it, not on the YAML file (which said nothing of the key)
    (["--config", "configs/tiny.yaml", "model.num_head=8"],
     "command line (model.num_head=8): unknown key 'model.num_head' (did you mean 'model.num_heads'?)"),
    (["--config", "configs/tiny.yaml", "train.steps=ten"], "command line (train.steps=ten): 'train.steps' must be int"),
    (["--config", "configs/tiny.yaml", "trian.steps=5"],
     "command line (trian.steps=5): unknown section 'trian' (did you mean 'train'?)"),
    (["train.steps=3", "--train.seq_len=64", "train.run_dir=x"],
     "--train.seq_len=64: overrides are written without dashes: train.seq_len=64"),
    (["posttrain.beta=0.5"], "posttrain.beta is set, but python -m litespark_jax.train pretrains"),
    (["trian.steps=3"], "command line (trian.steps=3): unknown section 'trian' (did you mean 'train'?)"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("var, value, message", [
    ("ATTN_PALLAS_CONFIG", '{"backwards": "fused"}', "ATTN_PALLAS_CONFIG: unknown Config field(s) ['backwards']"),
    ("MLP_PALLAS_CONFIG", "{tile_m: 128}", "MLP_PALLAS_CONFIG='{tile_m: 128}' is not JSON"),
])
def test_a_bad_kernel_config_variable_stops_the_run_before_it_starts(var, value, message):
    """The kernels read these only when traced (on a GPU, mid-run); the CLI checks them first, on any platform."""
    result = run_cli("train.steps=1", **{var: value})
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_help_lists_options_with_defaults():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "model.num_kv_heads=4" in result.stdout and "train.seq_len=256" in result.stdout


@pytest.mark.parametrize("module, args, message", [
    ("litespark_jax.sft", ["--config", "configs/sft-tiny.yaml", "posttrain.template=llama9"], "posttrain.template"),
    ("litespark_jax.dpo", ["--config", "configs/dpo-tiny.yaml", "posttrain.beta=-1"],
     "posttrain.beta must be positive"),
])
def test_posttrain_clis_share_the_one_line_errors(module, args, message):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("module, args, message", [
    ("litespark_jax.posttrain.bench", ["--steps", "0"], "--steps must be >= 1"),
    ("litespark_jax.checkpoint.bench", ["--config", "configs/tiny.yaml", "--steps", "0"],
     "--steps 0: must be at least 1"),
    ("litespark_jax.data.benchmark", ["--repeat", "0"], "--repeat 0: must be at least 1"),
    ("litespark_jax.autotune", ["--config", "configs/tiny.yaml", "--out", "t.json", "--iters", "0"], "--iters"),
    ("litespark_jax.autotune", ["--config", "configs/tiny.yaml", "--out", "t.json", "--tolerance", "-1"],
     "--tolerance >= 0"),  # was a ValueError from min() over no passing implementation
    ("pallas_kernels.bench.attention", ["llama-9b"], "unknown shape 'llama-9b'; choose from llama-8b-s4k"),
    ("pallas_kernels.bench.attention_timeline", ["llama-9b"], "unknown shape 'llama-9b'; choose from llama-8b-s4k"),
    ("pallas_kernels.bench.attention_timeline", ["--calls", "0"], "--calls 0: must be at least 1"),
    ("pallas_kernels.bench.attention_timeline", [], "traces GPU kernels; no GPU here"),
    # Output files and variants that the run would have written or timed wrongly only at its end:
    ("litespark_jax.bench", ["--config", "configs/tiny.yaml", "--variant", "accum2=train.grad_accum_steps=2"],
     "no overrides after NAME: (it would time the preset again)"),
    ("litespark_jax.bench", ["--config", "configs/tiny.yaml", "--variant", "a=b:train.steps=2"],
     "the name 'a=b' holds '='"),
    ("litespark_jax.bench", ["--config", "configs/tiny.yaml", "--jsonl", "/nonexistent/dir/x.jsonl"],
     "--jsonl /nonexistent/dir/x.jsonl: the directory /nonexistent/dir does not exist"),
    ("litespark_jax.bench", ["--config", "configs/tiny.yaml", "--compile-only", "--jsonl", "x.jsonl"],
     "--jsonl and --profile need timed steps; --compile-only times none"),
    ("litespark_jax.autotune", ["--config", "configs/tiny.yaml", "--out", "/nonexistent/k.json"],
     "--out /nonexistent/k.json: the directory /nonexistent does not exist"),
])
def test_benchmark_clis_refuse_counts_that_time_nothing(module, args, message):
    """Counts below 1 once ended in a ZeroDivisionError, an IndexError or an empty median, an unknown shape name in a
    StopIteration: now one line naming the flag, before any work starts."""
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stdout
    assert message in result.stderr and "Traceback" not in result.stderr


CORPUS_SHARDS = "litespark_jax/data/corpus/pycorpus/validation/chunk*/*.jsonl.zst"


@pytest.mark.parametrize("module, args", [
    ("litespark_jax.convert", ["to-hf", "--checkpoint", "no-such-checkpoint", "--out"]),
    ("litespark_jax.convert", ["from-hf", "--hf-dir", "no-such-dir", "--out"]),
    ("litespark_jax.prepare", ["--files", CORPUS_SHARDS, "--out"]),
    ("litespark_jax.tokenizer", ["train", "--files", CORPUS_SHARDS, "--vocab-size", "300", "--out"]),
])
def test_an_output_directory_that_cannot_be_made_is_one_line_before_any_work(module, args, tmp_path):
    """These once ended in a FileExistsError traceback, after the work (a tokenizer trained, a checkpoint read)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    for out, message in ((a_file, "is a file, not a directory"), (a_file / "sub", "cannot create it")):
        result = subprocess.run([sys.executable, "-m", module, *args, str(out)], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        assert f"--out {out}: {message}" in result.stderr and "Traceback" not in result.stderr, result.stderr
    # A usable --out that the command then refuses for another reason is not left behind, empty.
    if module == "litespark_jax.convert":
        result = subprocess.run([sys.executable, "-m", module, *args, str(tmp_path / "new" / "out")], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "new").exists()


_NO_BACKEND_AT_IMPORT = r"""
import importlib, os, sys
os.environ.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
from jax._src import xla_bridge
for name in sys.argv[1:]:
    importlib.import_module(name)
    assert not xla_bridge._backends, f"importing {name} started a JAX backend"
from litespark_jax.cli import GPU_MEMORY_FRACTION, run_main
run_main(lambda argv: print("fraction", os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"]) or 0)
"""


def test_entry_points_leave_the_backend_unstarted_so_the_memory_fraction_counts():
    """XLA_PYTHON_CLIENT_MEM_FRACTION is read when the backend starts: an entry module that touches a device at
    import time would silently cap a GPU step at 75% of the card (it happened to the bench)."""
    modules = ["litespark_jax.bench", "litespark_jax.train.__main__", "litespark_jax.plan", "litespark_jax.convert",
               "litespark_jax.checkpoint.bench", "litespark_jax.posttrain.bench", "pallas_kernels.bench.__main__"]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", _NO_BACKEND_AT_IMPORT, *modules], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fraction 0.95" in result.stdout


def test_the_commands_info_lines_print_even_after_orbax_configured_logging():
    """Importing orbax has absl set up the root logger at WARNING, which made ``logging.basicConfig`` a no-op: every
    INFO line (the tokenizer hint of ``convert from-hf``, the distributed join, the kernel table) was silent."""
    script = ("import logging, sys; import orbax.checkpoint; from litespark_jax.cli import run_main; "
              "sys.exit(run_main(lambda argv: logging.getLogger('litespark_jax.convert').info('hint line') or 0))")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    assert "hint line" in result.stderr


def test_bench_refuses_a_batch_the_mesh_cannot_split_with_the_trainers_message():
    """It was a sharding traceback from ``device_put`` (the bench did not run the trainer's shape checks)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run([sys.executable, "-m", "litespark_jax.bench", "--config", "configs/tiny.yaml",
                             "--compile-only", "train.global_batch_size=3"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stdout
    assert "train.global_batch_size / train.grad_accum_steps (3) is not divisible by mesh.data (1) x mesh.fsdp (2)" \
        in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("module, says", [("sft", "bundled SFT examples"), ("dpo", "bundled DPO pairs"),
                                          ("train.__main__", "bundled corpus")])
def test_help_says_what_each_command_runs_without_a_config(module, says, capsys):
    """sft/dpo --help described pretraining's default (the bundled corpus) for their own."""
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"litespark_jax.{module}").main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and says in out
    assert ("bundled corpus" in out) == (module == "train.__main__")


def test_ctrl_c_outside_the_training_loop_is_one_line_and_130(capsys):
    """Ctrl-C while SFT/DPO tokenized their data or compiled printed a KeyboardInterrupt traceback."""
    from litespark_jax.cli import run_main

    def main(argv):
        raise KeyboardInterrupt

    assert run_main(main, []) == 130
    assert capsys.readouterr().err == "interrupted (Ctrl-C)\n"
