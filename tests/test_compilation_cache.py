"""The command-line runs' persistent compilation cache: a second process loads the first one's train step."""

import contextlib
import json
import subprocess
import sys

import jax
import pytest

from litespark_jax import compilation_cache
from litespark_jax.compilation_cache import use_compilation_cache
from litespark_jax.config import DEFAULT_COMPILATION_CACHE_DIR
from litespark_jax.errors import ConfigError
from tests.checkpoint.conftest import TINY, subprocess_env

# A train run in a fresh process, counting the compilation cache's hits and misses through jax.monitoring.
_COUNTING_RUN = """
import json, sys
import jax.monitoring
from litespark_jax.cli import run_main
from litespark_jax.train.__main__ import main
events = {}
jax.monitoring.register_event_listener(lambda name, **kw: events.__setitem__(name, events.get(name, 0) + 1))
assert run_main(main, sys.argv[2:]) == 0
with open(sys.argv[1], "w") as f:
    json.dump(events, f)
"""

HITS, MISSES = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"


def _run(tmp_path, name, overrides, env):
    events = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, "-c", _COUNTING_RUN, str(events), *TINY, "train.steps=2",
                           f"train.run_dir={tmp_path / name}", *overrides],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(events.read_text()), proc.stderr


def _env_without_cache():
    env = subprocess_env()
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the tiny step compiles in well under jax's 1 s
    return env


def test_second_run_loads_the_first_runs_compiled_step(tmp_path):
    cache = tmp_path / "cache"
    first, log = _run(tmp_path, "first", [f"train.compilation_cache_dir={cache}"], _env_without_cache())
    assert f"XLA compilation cache: {cache}" in log
    assert first.get(MISSES, 0) >= 1 and first.get(HITS, 0) == 0, first
    assert any(cache.iterdir())
    second, _ = _run(tmp_path, "second", [f"train.compilation_cache_dir={cache}"], _env_without_cache())
    assert second.get(HITS, 0) >= first[MISSES] and second.get(MISSES, 0) == 0, (first, second)


@contextlib.contextmanager
def _cache_dir_set_to(directory):
    """jax's cache directory as a process started with JAX_COMPILATION_CACHE_DIR=directory (None: unset) sees it."""
    suite_cache = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", directory)
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", suite_cache)


def test_null_leaves_the_cache_off_and_the_environments_directory_wins(tmp_path):
    with _cache_dir_set_to(None):
        assert use_compilation_cache(None) is None
        assert jax.config.jax_compilation_cache_dir is None
    with _cache_dir_set_to(str(tmp_path / "from-env")):
        assert use_compilation_cache(str(tmp_path / "from-config")) == str(tmp_path / "from-env")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "from-env")
    assert not (tmp_path / "from-config").exists()


def test_a_directory_that_cannot_be_made_names_the_field(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with _cache_dir_set_to(None):
        with pytest.raises(ConfigError, match=r"train.compilation_cache_dir .*a-file/xla.*cannot create it"):
            use_compilation_cache(str(blocker / "xla"))


def test_an_unusable_default_directory_runs_without_the_cache(tmp_path, monkeypatch):
    """A home directory the run cannot write to (a read-only container image) is no reason to stop a run that
    did not ask for the cache."""
    home = tmp_path / "home"
    home.write_text("")  # a file: nothing can be created under it
    monkeypatch.setenv("HOME", str(home))
    warnings = []
    monkeypatch.setattr(compilation_cache.logger, "warning", lambda message, *args: warnings.append(message % args))
    with _cache_dir_set_to(None):
        assert use_compilation_cache(DEFAULT_COMPILATION_CACHE_DIR) is None
        assert jax.config.jax_compilation_cache_dir is None
    assert len(warnings) == 1 and "no XLA compilation cache: the default" in warnings[0], warnings


def test_several_processes_use_only_a_directory_set_for_them(tmp_path, monkeypatch):
    """A default home directory may be local to each host; only process 0 writes the cache, so a restart would mix
    loaded and freshly compiled steps across the processes."""
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with _cache_dir_set_to(None):
        assert use_compilation_cache(DEFAULT_COMPILATION_CACHE_DIR) is None
        assert jax.config.jax_compilation_cache_dir is None
        shared = str(tmp_path / "shared")
        assert use_compilation_cache(shared) == shared


# A fresh process compiling one small program through the cache directory argv[1]; argv[2] == "plain" opens it the
# way jax alone does (JAX_COMPILATION_CACHE_DIR), without use_compilation_cache. Prints jax.monitoring's counts.
_SMALL_PROGRAM = """
import json, sys
import jax, jax.monitoring, jax.numpy as jnp
events = {}
jax.monitoring.register_event_listener(lambda name, **kw: events.__setitem__(name, events.get(name, 0) + 1))
if sys.argv[2] == "plain":
    jax.config.update("jax_compilation_cache_dir", sys.argv[1])
else:
    from litespark_jax.compilation_cache import use_compilation_cache
    use_compilation_cache(sys.argv[1])
print(jax.jit(lambda x: (jnp.sin(x) * 3).sum())(jnp.ones(5)))
print(json.dumps(events))
"""


def _compile_small_program(cache, how="ours"):
    proc = subprocess.run([sys.executable, "-c", _SMALL_PROGRAM, str(cache), how], env=_env_without_cache(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _entries(cache):
    return {p.name: p.read_bytes() for p in cache.glob("*-cache")}


def test_an_entry_cut_short_by_a_killed_process_is_written_again(tmp_path):
    """jax alone keeps a truncated entry forever (every start warns and compiles); ours replaces it."""
    cache = tmp_path / "cache"
    _compile_small_program(cache)
    whole = _entries(cache)
    assert whole

    def cut_short():
        for name, data in whole.items():
            (cache / name).write_bytes(data[: len(data) // 2])

    cut_short()
    plain, log = _compile_small_program(cache, "plain")
    assert "Error reading persistent compilation cache entry" in log and plain.get(HITS, 0) == 0, plain
    assert all(len(data) == len(whole[name]) // 2 for name, data in _entries(cache).items()), "jax healed it"

    cut_short()
    second, log = _compile_small_program(cache)
    assert "Error reading persistent compilation cache entry" in log, log[-2000:]
    assert {name: len(data) for name, data in _entries(cache).items()} == {n: len(d) for n, d in whole.items()}
    third, log = _compile_small_program(cache)
    assert third.get(MISSES, 0) == 0 and third.get(HITS, 0) >= len(whole), third
    assert "Error reading" not in log


def test_an_interrupted_write_leaves_no_entry_and_a_full_cache_evicts_the_oldest(tmp_path, monkeypatch):
    cache = compilation_cache.WholeEntryCache(str(tmp_path), max_size=130)
    cache.put("old", b"a" * 60)

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(compilation_cache.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.put("new", b"b" * 60)
    monkeypatch.undo()
    assert cache.get("new") is None and not list(tmp_path.glob(".*.tmp"))
    assert cache.get("old") == b"a" * 60
    cache.put("new", b"b" * 60)
    cache.put("newer", b"c" * 60)  # 180 bytes > 130: the least recently used goes
    assert cache.get("newer") == b"c" * 60 and cache.get("new") == b"b" * 60 and cache.get("old") is None


def test_stale_temporary_files_are_removed_when_the_cache_opens(tmp_path):
    import os
    import time

    stale, fresh = tmp_path / ".k1-cache.123.tmp", tmp_path / ".k2-cache.456.tmp"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    compilation_cache.WholeEntryCache(str(tmp_path), max_size=-1)
    assert not stale.exists() and fresh.exists()  # a process may still be writing the fresh one


def test_the_size_limit_applies_to_our_directory_unless_jax_has_one(tmp_path):
    suite_limit = jax.config.jax_compilation_cache_max_size
    try:
        with _cache_dir_set_to(None):
            jax.config.update("jax_compilation_cache_max_size", -1)
            use_compilation_cache(str(tmp_path / "a"), max_gb=2.5)
            assert jax.config.jax_compilation_cache_max_size == 2_500_000_000
        with _cache_dir_set_to(None):
            jax.config.update("jax_compilation_cache_max_size", 123)  # JAX_COMPILATION_CACHE_MAX_SIZE
            use_compilation_cache(str(tmp_path / "b"), max_gb=2.5)
            assert jax.config.jax_compilation_cache_max_size == 123
    finally:
        jax.config.update("jax_compilation_cache_max_size", suite_limit)


def test_a_size_limit_that_is_not_positive_is_a_config_error():
    from litespark_jax.config import load_config

    with pytest.raises(ConfigError, match=r"train.compilation_cache_max_gb must be positive or null .* got 0"):
        load_config("configs/tiny.yaml", ["train.compilation_cache_max_gb=0"])
    assert load_config("configs/tiny.yaml", ["train.compilation_cache_max_gb=null"]).train.compilation_cache_max_gb \
        is None
