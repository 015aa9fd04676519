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
