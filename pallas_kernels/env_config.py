"""Kernel configs changed through environment variables for tuning runs (``ATTN_PALLAS_CONFIG``,
``MLP_PALLAS_CONFIG``): a JSON object of the config dataclass's fields, applied over the kernel's default."""

from __future__ import annotations

import dataclasses
import json
import os


class KernelConfigError(ValueError):
    """A kernel config variable is not a JSON object of known fields (the CLIs report it as a user error)."""


def replace_from_env(config, var: str):
    """``config`` with the fields in ``$var`` changed; ``config`` itself when the variable is unset or empty."""
    raw = os.environ.get(var)
    if not raw:
        return config
    kind = type(config).__name__
    try:
        fields = json.loads(raw)
    except json.JSONDecodeError as e:
        raise KernelConfigError(f"{var}={raw!r} is not JSON ({e.msg} at character {e.pos}); expected an object of "
                                f"{kind} fields, e.g. '{{\"field\": value}}'") from None
    if not isinstance(fields, dict):
        raise KernelConfigError(f"{var}={raw!r}: expected a JSON object of {kind} fields")
    known = [f.name for f in dataclasses.fields(config)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise KernelConfigError(f"{var}: unknown {kind} field(s) {unknown}; the fields are {known}")
    return dataclasses.replace(config, **fields)


VARIABLES = ("ATTN_PALLAS_CONFIG", "MLP_PALLAS_CONFIG")


def check_all() -> None:
    """Parse every kernel config variable that is set, so a typo stops a run before it starts."""
    if not any(os.environ.get(var) for var in VARIABLES):
        return
    from pallas_kernels.attention import mosaic_gpu as attention_mgpu
    from pallas_kernels.mlp import mosaic_gpu as mlp_mgpu

    attention_mgpu.default_config(128)
    mlp_mgpu.default_config()
