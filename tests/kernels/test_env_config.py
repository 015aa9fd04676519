"""Kernel configs from ``ATTN_PALLAS_CONFIG`` / ``MLP_PALLAS_CONFIG``: fields applied over the default; anything
else is a ``KernelConfigError`` naming the variable and what is wrong."""

import pytest

from pallas_kernels.attention import mosaic_gpu as attention_mgpu
from pallas_kernels.env_config import KernelConfigError, check_all
from pallas_kernels.mlp import mosaic_gpu as mlp_mgpu


def test_fields_apply_over_the_head_dim_default(monkeypatch):
    monkeypatch.setenv("ATTN_PALLAS_CONFIG", '{"backward": "fused", "bwd_steps": 3}')
    d64 = attention_mgpu.default_config(64)
    assert (d64.backward, d64.bwd_steps, d64.max_concurrent_steps) == ("fused", 3, 3)  # D64 keeps its 3 stages
    assert attention_mgpu.default_config(128).max_concurrent_steps == 2
    monkeypatch.setenv("MLP_PALLAS_CONFIG", '{"epi_slots": 2}')
    assert mlp_mgpu.default_config().epi_slots == 2
    monkeypatch.delenv("ATTN_PALLAS_CONFIG")
    assert attention_mgpu.default_config(128) == attention_mgpu.Config(block_q=64, block_kv=128,
                                                                       max_concurrent_steps=2)


@pytest.mark.parametrize("var, value, message", [
    ("ATTN_PALLAS_CONFIG", '{"backwards": "fused"}', "unknown Config field(s) ['backwards']"),
    ("ATTN_PALLAS_CONFIG", "{backward: fused}", "is not JSON"),
    ("ATTN_PALLAS_CONFIG", '["fused"]', "expected a JSON object of Config fields"),
    ("MLP_PALLAS_CONFIG", '{"tile": 128}', "unknown SwiGLUConfig field(s) ['tile']"),
])
def test_bad_values_name_the_variable_and_the_problem(monkeypatch, var, value, message):
    monkeypatch.setenv(var, value)
    with pytest.raises(KernelConfigError, match=var) as err:
        check_all()
    assert message in str(err.value)


def test_nothing_set_checks_nothing(monkeypatch):
    monkeypatch.delenv("ATTN_PALLAS_CONFIG", raising=False)
    monkeypatch.setenv("MLP_PALLAS_CONFIG", "")
    check_all()
