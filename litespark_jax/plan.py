"""Cluster planner: per-device memory, FLOPs, collective bytes, predicted step time and MFU for each candidate mesh.

    python -m litespark_jax.plan --config configs/llama-30b.yaml --nodes 4 --gpus-per-node 8 --gpu h200
    python -m litespark_jax.plan --config configs/llama-3.2-3b.yaml --nodes 1 --gpus-per-node 1 --gpu h100
    python -m litespark_jax.plan --config configs/tiny.yaml --nodes 1 --gpus-per-node 8 --xla-check

The memory model counts, per device: parameters, Adam moments and gradients (each array's shard, from the same
logical-axis rules the trainer uses), the activations each layer keeps for the backward under the remat policy,
the largest of one layer's forward, one layer's backward and the loss head (chunked cross-entropy or full logits),
and the all-gathered weights of the layer being computed. With unrolled layers and ``cast_weights_once`` the
gradients give way to the cast weight copy (no gradient exists yet at the end of the forward, where the peak is),
and under FSDP a backlog of weight-gradient inputs can move the peak into the backward (``memory_model``). The
attention runs per device inside ``shard_map`` (``litespark_jax.parallel.kernels.attention``): whole sequences,
heads split over tensor x context. Adam moments
are counted in ``optim.state_dtype``; ``remat_policy=names`` keeps each saved ``checkpoint_name`` activation.
``--xla-check`` compiles the real train step for the mesh ahead of time on CPU host devices and compares with XLA's
own ``memory_analysis()`` (arguments + outputs - aliased + temporaries); on CPU the attention is the reference
(materialized scores), so the check models that too (see docs/SCALING.md for what the CPU step holds).

The time model: compute = model FLOPs (plus remat recompute) / (peak x step efficiency), the efficiency measured end
to end on one GPU (``EFFICIENCY["compute"]``, ``--efficiency``); FSDP all-gathers and reduce-scatters and the
data-parallel all-reduce overlap with compute as far as it covers them, but a measured share of their time shows on
the step anyway (``EFFICIENCY["exposed_comm"]``, from a 2-GPU profile); tensor- and context-parallel collectives sit
on the critical path. A collective over an axis that spans nodes runs at the
inter-node (InfiniBand) rate, otherwise at the NVLink rate. All constants are in ``GPUS`` and ``EFFICIENCY``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

from litespark_jax.cli import ArgumentParser

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    peak_tflops: float  # dense bf16
    hbm_gib: float  # usable by XLA: XLA_PYTHON_CLIENT_MEM_FRACTION of CUDA's memory (GPUS: launch/'s 0.9)
    nvlink_gbps: float  # per-GPU unidirectional NVLink bandwidth, GB/s
    ib_gbps: float  # per-GPU inter-node bandwidth (one 400 Gb/s NIC per GPU), GB/s
    host_gbps: float  # per-GPU host link (PCIe Gen5 x16), GB/s per direction: optim.offload_state's transfers


# The memory CUDA gives XLA on each card (XLA_PYTHON_CLIENT_MEM_FRACTION applies to this), in bytes. H100 80GB HBM3:
# measured, ``jax.devices()[0].memory_stats()["bytes_limit"]`` = 76,516,687,872 B at 0.9 (71.26 GiB; 75.22 at 0.95;
# nvidia-smi: 81,559 MiB). H200 141GB: derived from its 143,771 MiB (nvidia-smi) with the share of it the H100 exposes
# to CUDA (0.9941), not measured. The planner used 80e9 and 141e9 bytes before, 6% under what XLA gets.
_H100_CUDA_BYTES = 76_516_687_872 / 0.9
_CUDA_SHARE = _H100_CUDA_BYTES / (81_559 * 2**20)  # of the memory nvidia-smi reports
CUDA_BYTES = {"h100": _H100_CUDA_BYTES, "h200": _CUDA_SHARE * 143_771 * 2**20}
LAUNCH_MEM_FRACTION = 0.9  # launch/env.sh and launch/local.py; the one-process CLIs default to 0.95 (cli.py)


def usable_gib(name: str, mem_fraction: float) -> float:
    """The memory XLA gets on card ``name`` under ``mem_fraction`` of what CUDA offers."""
    return mem_fraction * CUDA_BYTES[name] / GiB


GPUS = {
    "h100": GPU("H100 SXM 80GB", 989.0, usable_gib("h100", LAUNCH_MEM_FRACTION), 450.0, 50.0, 64.0),
    "h200": GPU("H200 SXM 141GB", 989.0, usable_gib("h200", LAUNCH_MEM_FRACTION), 450.0, 50.0, 64.0),
}


def mem_fraction_for(devices: int) -> float:
    """The ``XLA_PYTHON_CLIENT_MEM_FRACTION`` a run on this many GPUs gets by default: one GPU is a one-process CLI
    run (``cli.GPU_MEMORY_FRACTION``, 0.95), several are started by launch/ (0.9)."""
    from litespark_jax.cli import GPU_MEMORY_FRACTION

    return float(GPU_MEMORY_FRACTION) if devices == 1 else LAUNCH_MEM_FRACTION


def gpu_with_fraction(name: str, mem_fraction: float) -> GPU:
    """``GPUS[name]`` with the memory XLA gets under ``mem_fraction`` of what CUDA offers."""
    return dataclasses.replace(GPUS[name], hbm_gib=usable_gib(name, mem_fraction))


EFFICIENCY = {
    # Fraction of peak at which a whole one-GPU step runs its FLOPs (model + recompute): matmuls, attention and every
    # memory-bound kernel together. Measured: the 3B preset on one H100, 54.3% MFU with the single-pass loss
    # (docs/SCALING.md; 53.4% with the chunked loss, whose extra vocabulary matmul plan_mesh now counts). It was an
    # assumed 0.72 (matmuls alone), which put every step-time prediction 26-33% under the measured H100 steps.
    "compute": 0.543,
    "nvlink": 0.80,  # NCCL bus bandwidth / link bandwidth
    "ib": 0.80,
    "host": 0.75,  # pinned host <-> device copies / PCIe link rate: 55 GB/s of 64 measured (0.86) for 16 GiB on an
    # H100; 0.75 also covers the per-parameter updates between copies (7B: 0.80 s predicted, 0.78 s measured)
    "overlap": 0.85,  # fraction of compute time that can hide FSDP/DP collectives
    # ... but this share of the modelled FSDP/DP collective time shows anyway. Measured on 2 x H100 (3B preset,
    # FSDP-2, docs/SCALING.md): NCCL kernels ran 43.0 ms per GPU and step with nothing else running, against 45 ms of
    # modelled FSDP traffic; with it the 8B FSDP-2 step is predicted within 2% (was -10% with all of it hidden).
    "exposed_comm": 0.95,
    "launch_s": 20e-6,  # per collective latency
}
# remat_policy=names with these (and the mid residual or something it is rebuilt from without a matmul) keeps every
# matmul output the backward needs: only norms, RoPE and SiLU are recomputed (configs/llama-3.2-3b.yaml).
NO_RECOMPUTE_NAMES = frozenset({"query", "key", "value", "attention_out", "mlp_gate_up"})
HEADROOM = 0.92  # a plan "fits" when its predicted peak is within this fraction of the usable memory (fragmentation,
# cuDNN/cuBLAS workspaces and the model's own error, measured within 10% of XLA's figure)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The share of the layers whose weight-gradient matmuls are still waiting at the peak of an FSDP backward with unrolled
# layers (memory_model's "wgrad_backlog"): 18 of 28 (3B preset) and 17 of 32 (8B) in the steps compiled for two H200s.
WGRAD_TRAILING_LAYERS = 0.6


@dataclasses.dataclass
class Plan:
    mesh: dict
    inter: dict
    grad_accum: int
    micro_batch: int  # sequences per device per micro-batch
    memory: dict  # component -> bytes per device
    flops_per_device: float
    collectives: dict  # kind -> bytes per device per step
    times: dict  # component -> seconds
    step_s: float
    mfu: float
    fits: bool
    remat: str = ""
    usable_bytes: float = 0.0  # what XLA gets on the card: a plan over HEADROOM x this but under it is "tight"
    tighter: Plan | None = None  # the same mesh with fewer accumulation steps, tight (plan_all)

    @property
    def total_bytes(self) -> float:
        return sum(self.memory.values())

    @property
    def tight(self) -> bool:
        """Over the headroom plans keep, but within the memory XLA gets: it may fit (the memory model has been
        0.6-4.7% under XLA's figure on the measured runs), so it is shown, not recommended."""
        return not self.fits and self.total_bytes <= self.usable_bytes

    def fit_word(self) -> str:
        return "yes" if self.fits else "tight" if self.tight else "no"

    def name(self) -> str:
        return "x".join(str(self.mesh[a]) for a in ("data", "fsdp", "tensor", "context"))


# ----------------------------------------------------------------------------------------------------------------
# Memory


def _shard_splits(axes, sizes: dict, rules) -> tuple[int, int]:
    """(how many ways the parameter with these logical axes is split over the mesh, the same without fsdp)."""
    from litespark_jax.parallel.logical import logical_to_spec

    split = tensor_split = 1
    for part in logical_to_spec(axes, rules):
        for a in (part,) if isinstance(part, str) else (part or ()):
            split *= sizes[a]
            if a != "fsdp":
                tensor_split *= sizes[a]
    return split, tensor_split


def param_shard_bytes(cfg, sizes: dict, rules=None, dtype_bytes: int | None = None) -> tuple[float, float, float]:
    """(bytes of this device's parameter shards, bytes of one layer's params after the fsdp all-gather, total params)
    from the model's abstract parameters and their logical axes."""
    from litespark_jax.parallel.mesh import DEFAULT_RULES

    rules = rules or DEFAULT_RULES
    b = dtype_bytes or DTYPE_BYTES[cfg.param_dtype]
    sharded = gathered_layer = total = 0.0
    for shape, axes in _param_shapes(cfg):
        split, tensor_split = _shard_splits(axes, sizes, rules)
        n = math.prod(shape)
        total += n
        sharded += n * b / split
        if axes and axes[0] == "layers":
            gathered_layer += n / shape[0] / tensor_split
    return sharded, gathered_layer, total


def cast_layer_bytes(cfg, sizes: dict, rules=None) -> float:
    """This device's shards of every layer's weight matrices in the compute dtype (``model.cast_weights_once``: the
    norm scales keep their dtype)."""
    from litespark_jax.parallel.mesh import DEFAULT_RULES

    return sum(math.prod(shape) * DTYPE_BYTES[cfg.dtype] / _shard_splits(axes, sizes, rules or DEFAULT_RULES)[0]
               for shape, axes in _param_shapes(cfg) if axes[0] == "layers" and len(shape) >= 3)


def _param_shapes(cfg):
    """[(shape, logical axes)] of every parameter, without building the model."""
    d, f, h, kv, hd, L, V = (cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim,
                             cfg.num_layers, cfg.vocab_size)
    shapes = [((V, d), ("vocab", "embed")), ((d,), ("embed",))]
    if not cfg.tie_embeddings:
        shapes.append(((d, V), ("embed", "vocab")))
    shapes += [
        ((L, d), ("layers", "embed")), ((L, d), ("layers", "embed")),
        ((L, d, h, hd), ("layers", "embed", "heads", "head_dim")),
        ((L, d, kv, hd), ("layers", "embed", "kv_heads", "head_dim")),
        ((L, d, kv, hd), ("layers", "embed", "kv_heads", "head_dim")),
        ((L, h, hd, d), ("layers", "heads", "head_dim", "embed")),
        ((L, d, 2, f), ("layers", "embed", None, "mlp")),
        ((L, f, d), ("layers", "mlp", "embed")),
    ]
    return shapes


def _loss_impl(cross_entropy: str, sizes: dict) -> str:
    """The loss kernel that runs: a tensor-sharded vocabulary runs ``chunked`` where ``single_pass`` was asked
    (``litespark_jax.parallel.kernels.cross_entropy_sum``)."""
    return "chunked" if cross_entropy == "single_pass" and sizes["tensor"] > 1 else cross_entropy


def activation_bytes(cfg, micro_batch: int, seq_len: int, sizes: dict, attention: str, cross_entropy: str,
                     mlp: str = "fused") -> dict:
    """Activation memory per device: kept for the backward (all layers), and the working set on top of it: the
    largest of one layer's forward, one layer's backward (what it recomputes, the attention's backward, the float32
    cotangent of the residual stream) and the loss head, which are never live at the same time.

    The attention runs inside ``shard_map`` (``litespark_jax.parallel.kernels.attention``): each device holds whole
    sequences for its batch rows and ``heads / (tensor x context)`` heads, after a Ulysses all-to-all when
    ``context > 1`` and with K/V heads repeated when ``kv_heads`` does not divide ``tensor x context``."""
    from pallas_kernels.cross_entropy.chunked import default_vocab_chunk

    a = DTYPE_BYTES[cfg.dtype]
    t, c = sizes["tensor"], sizes["context"]
    b, s, s_full = micro_batch, seq_len // c, seq_len
    d, hd = cfg.d_model, cfg.resolved_head_dim
    h, kv, f = cfg.num_heads / t, cfg.num_kv_heads / t, cfg.d_ff / t
    T = b * s
    x = T * d * a
    # Outside the attention kernel activations are split by sequence over context and by heads over tensor.
    q, kvb, attn_out = T * h * hd * a, 2 * T * kv * hd * a, T * h * hd * a
    # Inside the shard_map: whole sequences, heads over tensor x context, K/V repeated if needed.
    tc = t * c
    kv_rep = 1 if cfg.num_kv_heads % tc == 0 else tc // math.gcd(cfg.num_kv_heads, tc)
    h_local, kv_local = cfg.num_heads / tc, cfg.num_kv_heads * kv_rep / tc
    # Re-sharded copies of Q, K, V and the output (all-to-all buffers / repeated K/V), one layer at a time.
    reshard = b * s_full * (2 * h_local + 2 * kv_local) * hd * a if (c > 1 or kv_rep > 1) else 0.0
    mask = b * s_full * s_full  # boolean [b, 1, S, S] from the segment ids
    if attention == "reference":
        sc = b * h_local * s_full * s_full  # score elements per device: local batch x local heads x S x S
        # Forward: float32 scores and probabilities, plus the two jnp.where fills (float32) and their broadcast masks
        # (bool) at score shape, which XLA hoists out of the layer scan as loop invariants.
        attn_fwd = sc * (4 + 4) + sc * (4 + 4 + 1 + 1) + mask
        # Backward: probabilities (recomputed), their cotangent and the scores' cotangent, all float32.
        attn_bwd = sc * 4 * 3 + mask
        attn_saved = sc * (4 + 4) + mask  # what remat_policy=none keeps per layer
    else:
        lse = b * h_local * s_full * 4  # flash attention keeps the logsumexp
        attn_fwd = attn_bwd = attn_saved = lse
    attn_fwd += reshard
    attn_bwd += reshard
    if mlp == "fused":
        mlp_act = T * 2 * f * a  # the [N, 2, f] pre-activation only
    else:
        mlp_act = T * 2 * f * 4 + T * f * 4 + T * f * a  # float32 gate/up, SiLU, product
    mlp_gather = 0.0
    if attention == "reference" and t > 1:
        # On the CPU check XLA's partitioner all-gathers the float32 gate/up activations over tensor in the
        # backward and forms their full-width cotangent (seen in the compiled HLO).
        mlp_gather = 2 * T * 2 * cfg.d_ff * 4
    # One layer's activations outside the attention kernel: inputs, norms, q/k/v, attention output, MLP, residuals.
    layer_rest = x * 5 + q + kvb + attn_out + mlp_act
    policy = cfg.remat_policy
    if policy == "none":
        kept = layer_rest + attn_saved
    elif policy == "full":
        kept = x
    elif policy == "save_attention":
        kept = x + attn_out
    elif policy == "save_matmuls":
        # Outputs of the dots without batch dims that the backward needs: q, k, v, the attention projection (to
        # rebuild the MLP input), the gate/up pre-activation; plus the layer input.
        kept = x + q + kvb + x + mlp_act
    else:  # names: the layer input plus each saved checkpoint_name (litespark_jax/model/layers.py)
        from litespark_jax.config import ACTIVATION_NAMES

        named = {"attention_in": x, "query": q, "key": kvb / 2, "value": kvb / 2, "attention_out": attn_out,
                 "attention_proj": x, "residual_mid": x, "mlp_in": x, "mlp_gate_up": mlp_act, "mlp_out": x}
        assert set(named) == set(ACTIVATION_NAMES), "plan.py: size every checkpoint_name of the model"
        kept = x + sum(named.get(n, 0) for n in dict.fromkeys(cfg.remat_save_names))
    L = cfg.num_layers
    # What one layer's backward recomputes beyond what the policy kept.
    recomputed = max(layer_rest + (attn_saved if policy == "none" else 0) - kept, 0.0)
    # Forward peak: around the attention (the layer input, its norm, q/k/v, the attention's forward working set).
    # Backward peak: the recomputed layer, the attention's backward working set, the residual stream's cotangent.
    forward = attn_fwd + 2 * x + q + kvb
    backward = recomputed + attn_bwd + mlp_gather + T * d * 4
    V = cfg.vocab_size / t
    cross_entropy = _loss_impl(cross_entropy, sizes)
    if cross_entropy == "reference":
        head = T * V * 4 * 3  # float32 logits, softmax, gradient
    elif cross_entropy == "single_pass":
        from pallas_kernels.cross_entropy.single_pass import default_row_chunk

        rows = default_row_chunk(int(T), int(V))
        # A row chunk's float32 logits and its gradient in the compute dtype (the exponentials fuse into it), the
        # float32 weight-gradient accumulator and the input gradient, formed in the forward.
        head = rows * V * (4 + a) + d * V * 4 + T * d * a
    else:
        chunk = default_vocab_chunk(int(T), int(V))
        head = T * min(chunk, V) * (4 + 4 + 2) + T * d * 4
    head += T * d * 4  # gathered embedding rows / its gradient
    # The forward of a layer, the backward of a layer and the loss head are separate phases; the step's peak is the
    # largest of them on top of what lives through the step.
    return {"activations_kept": L * kept, "working_set": max(forward, backward, head)}


def optimizer_bytes(cfg, sizes: dict, state_dtype: str) -> float:
    """Both Adam moments of this device's parameter shards."""
    params, _, _ = param_shard_bytes(cfg, sizes)
    return 2 * params * DTYPE_BYTES[state_dtype] / DTYPE_BYTES[cfg.param_dtype]


def memory_model(cfg, train, sizes: dict, micro_batch: int, attention: str, cross_entropy: str,
                 mlp: str = "fused", state_dtype: str = "float32", offload_state: bool = False) -> dict:
    """Device memory per device. With ``offload_state`` the moments live in host memory and pass through the
    device a parameter at a time after the gradients are made (``train.offload``): the update's peak is the
    parameters, the gradients and the two largest parameters' moments (the one updating and the next coming in),
    counted as ``update_moments`` beyond the activations' memory, which is free by then. Measured on the 7B with
    bf16 moments on an H100: 66.33 GiB in use at the peak, this model's 66.33."""
    params, gathered_layer, _ = param_shard_bytes(cfg, sizes)
    grads = params * 4 / DTYPE_BYTES[cfg.param_dtype]
    opt = 0.0 if offload_state else optimizer_bytes(cfg, sizes, state_dtype)
    a = DTYPE_BYTES[cfg.dtype]
    # Unrolled layers with their weights cast once (the 3B preset): the step's peak is at the end of the forward,
    # where every layer's activations are kept and no weight gradient exists yet, but every layer's compute-dtype
    # copy of its (sharded) weight matrices does, made before the first layer and read again by its backward. Seen
    # in the buffer assignment of the 3B preset's step compiled for one H100 (72.73 GiB, the measured figure): at
    # the peak, the float32 parameters, the moments, 28 layers' activations, the loss head and the 28 bf16 weight
    # splits, no gradient. The gradients come in the backward as the activations go (bf16 until the optimizer).
    cast_once = cfg.cast_weights_once and not cfg.scan_layers
    memory = {"params": params, "optimizer": opt}
    if cast_once:
        memory["cast_weights"] = cast_layer_bytes(cfg, sizes)
    else:
        memory["gradients"] = grads
    if train.grad_accum_steps > 1:
        memory["grad_accumulator"] = grads
    memory.update(activation_bytes(cfg, micro_batch, train.seq_len, sizes, attention, cross_entropy, mlp))
    # The layer being computed needs its weights whole along fsdp, in the compute dtype (with the weights cast once
    # and no fsdp, the cast copy is that).
    gathered = sizes["fsdp"] > 1 or (a != DTYPE_BYTES[cfg.param_dtype] and not cast_once)
    memory["gathered_weights"] = gathered_layer * a if gathered else 0.0
    if sizes["fsdp"] > 1 and not cfg.scan_layers:
        # FSDP with unrolled layers: the backward's weight-gradient matmuls trail its input-gradient chain by most
        # of the depth (their gradients then leave through reduce-scatters; at fsdp=1, with none, they follow at
        # once), so the step's peak can move from the end of the forward into the backward. There, each layer the
        # backward has passed (WGRAD_TRAILING_LAYERS of them) holds the SwiGLU backward's outputs, the [T, 2 d_ff]
        # gate/up gradient and the rebuilt [T, d_ff] hidden activation, in place of its saved [T, 2 d_ff]
        # pre-activation, plus three [T, d] cotangents, all waiting for those matmuls (its other saved activations
        # are their inputs and stay); its cast weights and the loss head's working set are gone. Seen in the buffer
        # assignments of the FSDP-2 steps compiled for two H200s: 3B preset at 12 x 4096, the weight-gradient inputs
        # of 18 of 28 layers live at the peak, 54.8 GiB of temporaries in the middle of the backward against 45.3
        # at the end of the forward; 8B at 2 x 8192, 17 of 32 layers, 33.2 against 33.6 (the forward's end stays
        # the peak). XLA's heap packing adds 1.5-3 GiB to the live bytes in these steps (not modelled).
        tokens = micro_batch * train.seq_len / sizes["context"]
        trailing = WGRAD_TRAILING_LAYERS * cfg.num_layers
        waiting = trailing * tokens * (cfg.d_ff / sizes["tensor"] + 3 * cfg.d_model) * a
        freed = memory["working_set"] + WGRAD_TRAILING_LAYERS * memory.get("cast_weights", 0.0)
        memory["wgrad_backlog"] = max(waiting - freed, 0.0)
    if attention == "reference" and cfg.remat_policy != "none":
        # The CPU check only: with a rematerialized layer scan XLA's CPU backend keeps two more copies of every
        # parameter shard live through the step (the stacked weights handed to the forward loop and to the
        # backward's recompute loop; seen in the buffer assignment of every remat case). With remat_policy=none the
        # copies also show in the live set but XLA's temp figure has no room for them (measured on tiny-none,
        # small-none and 1b; they land in buffers it accounts as arguments/outputs), so they are not added there.
        # The measured H100 step (flash attention) has no such copies (docs/SCALING.md).
        memory["param_copies"] = 2 * params
    if offload_state:
        in_flight = sum(moment_shard_bytes(cfg, sizes, state_dtype)[:2])
        freed = sum(v for k, v in memory.items() if k not in ("params", "optimizer", "gradients", "cast_weights"))
        memory["update_moments"] = max(in_flight - freed, 0.0)
    return memory


# ----------------------------------------------------------------------------------------------------------------
# FLOPs, collectives, time


def moment_shard_bytes(cfg, sizes: dict, state_dtype: str, rules=None) -> list[float]:
    """This device's bytes of both Adam moments of each parameter array, largest first: the order in which the
    streamed offload step (``train.offload``) moves them. The layers' weights are stacked, one array per kind."""
    from litespark_jax.parallel.mesh import DEFAULT_RULES

    per_element = 2 * DTYPE_BYTES[state_dtype]
    return sorted((per_element * math.prod(shape) / _shard_splits(axes, sizes, rules or DEFAULT_RULES)[0]
                   for shape, axes in _param_shapes(cfg)), reverse=True)


def plan_mesh(cfg, train, gpu: GPU, sizes: dict, inter: dict, grad_accum: int, attention: str = "flash",
              cross_entropy: str = "chunked", mlp: str = "fused", state_dtype: str = "float32",
              offload_state: bool = False, efficiency: float | None = None) -> Plan:
    """One mesh's plan. ``state_dtype`` is ``optim.state_dtype``: both Adam moments are stored in it;
    ``offload_state`` is ``optim.offload_state``: they live in host memory and cross the host link twice a step,
    one parameter at a time with the two directions overlapped (``train.offload``), which leaves one direction's
    time plus the largest parameter's copy in exposed (the update that needs them comes after the backward);
    ``efficiency`` replaces
    ``EFFICIENCY["compute"]`` (e.g. one measured for another model or kernel set)."""
    from litespark_jax.metrics import model_flops_per_token

    n_dev = math.prod(sizes.values())
    batch_split = sizes["data"] * sizes["fsdp"]
    micro_batch = train.global_batch_size // grad_accum // batch_split
    memory = memory_model(cfg, dataclasses.replace(train, grad_accum_steps=grad_accum), sizes, micro_batch,
                          attention, cross_entropy, mlp, state_dtype, offload_state)
    tokens = train.global_batch_size * train.seq_len
    model_flops = model_flops_per_token(cfg, train.seq_len) * tokens
    layer_flops = model_flops - 6 * tokens * cfg.d_model * cfg.vocab_size  # without the output head
    recompute = {"none": 0.0, "full": 1 / 3, "save_attention": 0.28, "save_matmuls": 0.03}.get(cfg.remat_policy)
    if recompute is None:  # names: free of recomputed matmuls when every matmul output the backward needs is kept
        saved = set(cfg.remat_save_names)
        keeps_all = NO_RECOMPUTE_NAMES <= saved and saved & {"residual_mid", "attention_proj", "mlp_in"}
        recompute = 0.0 if keeps_all else 0.15
    # The vocabulary-chunked loss recomputes its projection in the backward: one more 2 x d x V per token.
    loss_recompute = 2 * tokens * cfg.d_model * cfg.vocab_size if _loss_impl(cross_entropy, sizes) == "chunked" else 0
    flops = (model_flops + recompute * layer_flops + loss_recompute) / n_dev
    compute_s = flops / (gpu.peak_tflops * 1e12 * (efficiency or EFFICIENCY["compute"]))

    a = DTYPE_BYTES[cfg.dtype]
    params_total = cfg.num_params()
    fs, t, c, d = sizes["fsdp"], sizes["tensor"], sizes["context"], sizes["data"]
    regather = 2 if cfg.remat_policy != "none" else 1  # the backward of a rematerialized scan gathers again
    coll = {}
    coll["fsdp_all_gather"] = grad_accum * (1 + regather) * (fs - 1) / fs * params_total / t * a if fs > 1 else 0.0
    coll["fsdp_reduce_scatter"] = grad_accum * (fs - 1) / fs * params_total / t * 4 if fs > 1 else 0.0
    coll["data_all_reduce"] = 2 * (d - 1) / d * params_total / (fs * t) * 4 if d > 1 else 0.0
    T = micro_batch * train.seq_len / c
    tp_per_layer = (4 + 2 * (cfg.remat_policy != "none")) * 2 * (t - 1) / t * T * cfg.d_model * a
    coll["tensor_all_reduce"] = grad_accum * cfg.num_layers * tp_per_layer if t > 1 else 0.0
    kv_bytes = micro_batch * train.seq_len * 2 * cfg.num_kv_heads / t * cfg.resolved_head_dim * a
    qo_bytes = 2 * micro_batch * train.seq_len * cfg.num_heads / t * cfg.resolved_head_dim * a
    cp_per_layer = (2 + regather) * (c - 1) / c * (kv_bytes + qo_bytes) / c
    coll["context_all_to_all"] = grad_accum * cfg.num_layers * cp_per_layer if c > 1 else 0.0

    def rate(axes):  # bytes/s for a collective over these mesh axes
        crosses = any(inter[x] > 1 for x in axes)
        return 1e9 * (gpu.ib_gbps * EFFICIENCY["ib"] if crosses else gpu.nvlink_gbps * EFFICIENCY["nvlink"])

    times = {"compute": compute_s}
    hidden = (coll["fsdp_all_gather"] + coll["fsdp_reduce_scatter"]) / rate(["fsdp"]) + \
        coll["data_all_reduce"] / rate(["data"])
    times["fsdp_dp_comm"] = hidden
    times["tensor_comm"] = coll["tensor_all_reduce"] / rate(["tensor"]) + \
        (grad_accum * cfg.num_layers * 6 * EFFICIENCY["launch_s"] if t > 1 else 0)
    times["context_comm"] = coll["context_all_to_all"] / rate(["context"])
    exposed = exposed_comm(hidden, compute_s)
    if offload_state:  # one direction for all the moments, plus the first (largest) parameter's copy in
        moments = moment_shard_bytes(cfg, sizes, state_dtype)
        times["host_transfer"] = (sum(moments) + moments[0]) / (gpu.host_gbps * 1e9 * EFFICIENCY["host"])
        exposed += times["host_transfer"]
    step_s = compute_s + times["tensor_comm"] + times["context_comm"] + exposed
    mfu = model_flops / (step_s * gpu.peak_tflops * 1e12 * n_dev)
    fits = sum(memory.values()) <= HEADROOM * gpu.hbm_gib * GiB
    return Plan(sizes, inter, grad_accum, micro_batch, memory, flops, coll, times, step_s, mfu, fits,
                cfg.remat_policy, usable_bytes=gpu.hbm_gib * GiB)


def exposed_comm(comm_s: float, compute_s: float) -> float:
    """The FSDP/DP collective time left on the step: what the compute cannot cover, and at least the measured share
    that shows even when it could (``EFFICIENCY["exposed_comm"]``)."""
    return max(EFFICIENCY["exposed_comm"] * comm_s, comm_s - EFFICIENCY["overlap"] * compute_s, 0.0)


def candidate_meshes(cfg, train, nodes: int, gpus_per_node: int, mesh_cfg=None):
    """(axis sizes, inter-node factors) of every mesh worth planning; ``mesh_cfg``'s ``inter_node_*`` settings
    constrain how the nodes are placed, as they would in the run."""
    from litespark_jax.config import MeshConfig
    from litespark_jax.errors import ConfigError
    from litespark_jax.parallel.mesh import inter_node_shape

    mesh_cfg = mesh_cfg or MeshConfig()

    n = nodes * gpus_per_node
    for t in (1, 2, 4, 8):
        if t > gpus_per_node or gpus_per_node % t or cfg.num_kv_heads % t or cfg.num_heads % t or cfg.d_ff % t:
            continue
        for c in (1, 2, 4):
            if train.seq_len % c or cfg.num_heads % (t * c) or t * c > gpus_per_node or (c > 1 and train.seq_len < 8192):
                continue
            rest = n // (t * c)
            if n % (t * c):
                continue
            for d in (x for x in range(1, rest + 1) if rest % x == 0):
                fs = rest // d
                if cfg.d_model % fs:
                    continue
                sizes = {"data": d, "fsdp": fs, "tensor": t, "context": c}
                try:
                    inter = inter_node_shape(dataclasses.replace(mesh_cfg, **sizes), sizes, nodes)
                except ConfigError:  # this mesh cannot be laid out over the nodes (as the config places them)
                    continue
                if inter["tensor"] > 1 or inter["context"] > 1:
                    continue
                yield sizes, inter


REMAT_CHOICES = ("none", "save_matmuls", "save_attention", "full")


def plan_all(cfg, train, gpu: GPU, nodes: int, gpus_per_node: int, remat_policies=None, mesh_cfg=None,
             **kw) -> list[Plan]:
    """The best plan per (mesh, remat policy): the fewest gradient-accumulation steps whose memory fits."""
    plans = []
    for policy in remat_policies or (cfg.remat_policy,):
        pcfg = dataclasses.replace(cfg, remat_policy=policy)
        for sizes, inter in candidate_meshes(pcfg, train, nodes, gpus_per_node, mesh_cfg):
            split = sizes["data"] * sizes["fsdp"]
            best = tighter = None
            for accum in (a for a in range(1, train.global_batch_size + 1)
                          if train.global_batch_size % (a * split) == 0):
                p = plan_mesh(pcfg, train, gpu, sizes, inter, accum, **kw)
                p.remat = policy
                best = best or p
                if p.fits:
                    best = p
                    best.tighter = tighter
                    break
                tighter = tighter or (p if p.tight else None)
            if best is not None:
                plans.append(best)
    # Ties in predicted MFU (compute-bound plans) go to the one that moves fewer bytes, then uses less memory.
    plans.sort(key=lambda p: (not p.fits, round(-p.mfu, 3), round(p.times["fsdp_dp_comm"], 1), p.total_bytes))
    return plans


# ----------------------------------------------------------------------------------------------------------------
# XLA's figure


def xla_memory(config, sizes: dict) -> dict:
    """Compile the train step for this mesh on CPU host devices (ahead of time, nothing allocated) and return XLA's
    memory analysis per device. The process must have been started with enough host devices."""
    import jax

    from litespark_jax.config import MeshConfig
    from litespark_jax.parallel.logical import use_rules
    from litespark_jax.parallel.mesh import DEFAULT_RULES, batch_sharding, build_mesh
    from litespark_jax.train.offload import build_train_step, compile_ahead
    from litespark_jax.train.optimizer import build_optimizer, learning_rate_schedule
    from litespark_jax.train.state import abstract_model, init_train_state, state_shardings
    from litespark_jax.train.step import make_gradients

    n = math.prod(sizes.values())
    mesh = build_mesh(MeshConfig(**sizes), jax.devices()[:n])
    optimizer = build_optimizer(config.optim, config.train.steps)
    graphdef, abstract = abstract_model(config.model)
    state_sharding = state_shardings(optimizer, abstract, mesh, offload_opt_state=config.optim.offload_state)
    b_sharding = batch_sharding(mesh)

    state_shapes = jax.eval_shape(lambda: init_train_state(config.model, optimizer, 0))
    state_in = state_shapes  # the jit's in_shardings place them
    B, S = config.train.global_batch_size, config.train.seq_len
    batch = {k: jax.ShapeDtypeStruct((B, S), dt) for k, dt in
             (("inputs", "int32"), ("targets", "int32"), ("positions", "int32"), ("segment_ids", "int32"),
              ("loss_mask", "float32"))}
    with use_rules(mesh, DEFAULT_RULES):
        step = build_train_step(config, make_gradients(config, graphdef), optimizer,
                                learning_rate_schedule(config.optim, 10), state_sharding, b_sharding)
        _, m = compile_ahead(step, state_in, batch)  # offloaded: the gradient program's figure
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "aliased": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes, "total": total}


# ----------------------------------------------------------------------------------------------------------------
# Output


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def describe(plan: Plan, gpu: GPU) -> str:
    lines = [f"mesh data={plan.mesh['data']} fsdp={plan.mesh['fsdp']} tensor={plan.mesh['tensor']} "
             f"context={plan.mesh['context']}  (inter-node: {', '.join(f'{k}={v}' for k, v in plan.inter.items() if v > 1) or 'none'})"
             f", grad_accum={plan.grad_accum}, {plan.micro_batch} sequence(s) per device per micro-batch"]
    lines.append(f"  memory per device (GiB, of {gpu.hbm_gib:.1f} usable; plans keep {100 * (1 - HEADROOM):.0f}% headroom):")
    for k, v in plan.memory.items():
        lines.append(f"    {k:<18} {_gib(v):>8}")
    verdict = {"yes": "fits", "tight": "TIGHT: over the headroom, within the card (may fit)", "no": "DOES NOT FIT"}
    lines.append(f"    {'total':<18} {_gib(plan.total_bytes):>8}  {verdict[plan.fit_word()]}")
    lines.append(f"  FLOPs per device per step: {plan.flops_per_device / 1e12:.1f} TFLOP")
    lines.append("  collective bytes per device per step (GB): " + ", ".join(
        f"{k} {v / 1e9:.2f}" for k, v in plan.collectives.items() if v))
    lines.append("  time (s): " + ", ".join(f"{k} {v:.3f}" for k, v in plan.times.items()) +
                 f" -> step {plan.step_s:.3f} s, MFU {100 * plan.mfu:.1f}%")
    return "\n".join(lines)


def limiter(plan: Plan) -> str:
    t = plan.times
    exposed = exposed_comm(t["fsdp_dp_comm"], t["compute"])
    parts = {"compute (step efficiency)": t["compute"], "exposed FSDP/DP collectives": exposed,
             "tensor-parallel all-reduces": t["tensor_comm"], "context-parallel all-to-alls": t["context_comm"]}
    return max(parts, key=parts.get)


def parse_mesh(text: str, num_devices: int) -> dict:
    """``DATAxFSDPxTENSORxCONTEXT`` (e.g. ``2x16x2x1``) as mesh axis sizes; ValueError unless it is four positive
    integers whose product is the number of devices planned for."""
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError("expected four positive integers DATAxFSDPxTENSORxCONTEXT, e.g. 2x16x2x1")
    sizes = dict(zip(("data", "fsdp", "tensor", "context"), map(int, parts)))
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"its axes multiply to {math.prod(sizes.values())}, but --nodes x --gpus-per-node is "
                         f"{num_devices}")
    return sizes


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m litespark_jax.plan", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    parser.add_argument("--mesh", default=None, help="only this mesh, DATAxFSDPxTENSORxCONTEXT (e.g. 2x16x2x1)")
    parser.add_argument("--remat", choices=("config", "all"), default="config",
                        help="plan with the config's remat policy, or also try none/save_matmuls/save_attention/full")
    parser.add_argument("--top", type=int, default=10, help="rows of the candidate table")
    parser.add_argument("--attention", choices=("flash", "reference"), default=None,
                        help="attention memory model (default: flash on GPU plans, reference with --xla-check)")
    parser.add_argument("--efficiency", type=float, default=None,
                        help=f"fraction of peak a one-GPU step reaches on its FLOPs (default "
                             f"{EFFICIENCY['compute']}, measured on the 3B preset; see docs/SCALING.md)")
    parser.add_argument("--mem-fraction", type=float, default=None,
                        help="XLA_PYTHON_CLIENT_MEM_FRACTION the run will use (default: 0.95 for one GPU, the "
                             "one-process CLIs' setting; 0.9 for several, launch/'s)")
    parser.add_argument("--xla-check", action="store_true",
                        help="compile the step on CPU host devices and compare with XLA's memory analysis")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(argv)
    if args.efficiency is not None and not 0 < args.efficiency <= 1:
        parser.error(f"--efficiency {args.efficiency}: a fraction of the peak, in (0, 1]")
    if args.mem_fraction is not None and not 0 < args.mem_fraction <= 1:
        parser.error(f"--mem-fraction {args.mem_fraction}: a fraction of the card's memory, in (0, 1]")
    from litespark_jax.cli import require_at_least

    require_at_least(parser, args, nodes=1, gpus_per_node=1, top=1)
    n = args.nodes * args.gpus_per_node
    mesh_sizes = None
    if args.mesh:
        try:
            mesh_sizes = parse_mesh(args.mesh, n)
        except ValueError as e:
            parser.error(f"--mesh {args.mesh}: {e}")
    if args.xla_check:
        os.environ["JAX_PLATFORMS"] = "cpu"
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    from litespark_jax.config import load_config

    # --mesh's sizes go in as overrides, so the config's checks (inter_node_* dividing its axis, ...) see them
    mesh_overrides = [f"mesh.{axis}={size}" for axis, size in (mesh_sizes or {}).items()]
    config = load_config(args.config, [*args.overrides, *mesh_overrides])  # a UserError: run_main's one line
    fraction = args.mem_fraction if args.mem_fraction is not None else mem_fraction_for(n)
    cfg, train, gpu = config.model, config.train, gpu_with_fraction(args.gpu, fraction)
    kw = plan_options(config, n, args.attention or ("reference" if args.xla_check else "flash"), args.efficiency)
    attention, ce = kw["attention"], kw["cross_entropy"]
    print(f"{args.config or 'defaults'}: {cfg.num_params() / 1e9:.2f}B parameters, global batch "
          f"{train.global_batch_size} x {train.seq_len} tokens, remat={cfg.remat_policy}"
          + (f" (saving {', '.join(cfg.remat_save_names)})" if cfg.remat_policy == "names" else "")
          + f", dtype={cfg.dtype}, Adam moments in {config.optim.state_dtype}"
          + (" in host memory" if config.optim.offload_state else "") + "; "
          f"{args.nodes} node(s) x {args.gpus_per_node} {gpu.name} (attention model: {attention}, loss: {ce}; "
          f"memory fraction {fraction:g}: {gpu.hbm_gib:.1f} GiB usable)")
    if mesh_sizes:
        from types import SimpleNamespace

        from litespark_jax.parallel.mesh import check_shapes, inter_node_shape

        sizes = mesh_sizes
        # The config's mesh.inter_node_* settings count: the error for an unplaceable mesh tells the user to set them.
        inter = inter_node_shape(dataclasses.replace(config.mesh, **sizes), sizes, args.nodes)
        check_shapes(config, SimpleNamespace(shape=sizes))
        plans = [plan_mesh(cfg, train, gpu, sizes, inter, train.grad_accum_steps, **kw)]
    else:
        plans = plan_all(cfg, train, gpu, args.nodes, args.gpus_per_node,
                         remat_policies=REMAT_CHOICES if args.remat == "all" else None, mesh_cfg=config.mesh, **kw)
    if not plans:
        print("no mesh divides this model and batch over these devices")
        return 1
    print(f"\n{'mesh DxFxTxC':<14}{'remat':>15}{'accum':>6}{'mem GiB':>9}{'fits':>6}{'step s':>9}{'MFU %':>7}  limited by")
    for p in plans[:args.top]:
        print(f"{p.name():<14}{p.remat:>15}{p.grad_accum:>6}{_gib(p.total_bytes):>9}{p.fit_word():>6}"
              f"{p.step_s:>9.3f}{100 * p.mfu:>7.1f}  {limiter(p)}")
    best = plans[0]
    print(f"\nrecommended: mesh.data={best.mesh['data']} mesh.fsdp={best.mesh['fsdp']} "
          f"mesh.tensor={best.mesh['tensor']} mesh.context={best.mesh['context']}"
          + (f" train.grad_accum_steps={best.grad_accum}" if best.grad_accum != train.grad_accum_steps else "")
          + (f" model.remat_policy={best.remat}" if best.remat != cfg.remat_policy else ""))
    print(describe(best, gpu))
    if best.tighter is not None:
        t = best.tighter
        print(f"\nalso possible: train.grad_accum_steps={t.grad_accum} ({t.micro_batch} sequence(s) per device per "
              f"micro-batch, step {t.step_s:.3f} s) is predicted at {_gib(t.total_bytes)} GiB of {gpu.hbm_gib:.1f}: "
              f"over the {100 * (1 - HEADROOM):.0f}% headroom but within the card.\nThe memory model has been "
              "0.6-4.7% under XLA's figure on the measured runs (docs/SCALING.md): try it with a short run.")
    if args.xla_check:
        checked = dataclasses.replace(config, train=dataclasses.replace(train, grad_accum_steps=best.grad_accum),
                                      model=dataclasses.replace(cfg, remat_policy=best.remat))
        figure = xla_memory(checked, best.mesh)
        # With offloaded moments XLA's figure is the gradient program's; the update's moments come after it.
        update = best.memory.get("update_moments", 0.0)
        predicted = best.total_bytes - update
        error = (predicted - figure["total"]) / figure["total"]
        print(f"\nXLA (CPU) compiled memory per device: {_gib(figure['total'])} GiB (arguments {_gib(figure['arguments'])}, "
              f"outputs {_gib(figure['outputs'])}, aliased {_gib(figure['aliased'])}, temp {_gib(figure['temp'])}); "
              f"predicted {_gib(predicted)} GiB: {100 * error:+.1f}%"
              + (f" (the gradient program; the update's moments in flight add {_gib(update)} GiB)" if update else ""))
    return 0


def plan_options(config, n_devices: int, attention: str = "flash", efficiency: float | None = None) -> dict:
    """``plan_mesh``'s keyword arguments for a loaded config (the kernels and optimizer state it runs with)."""
    cfg = config.model
    return dict(attention=attention, cross_entropy=_resolved_ce(cfg, config.train, n_devices),
                mlp="reference" if cfg.mlp_impl == "reference" else "fused", state_dtype=config.optim.state_dtype,
                offload_state=config.optim.offload_state, efficiency=efficiency)


def _resolved_ce(cfg, train, n_devices: int) -> str:
    if cfg.cross_entropy_impl in ("reference", "chunked", "single_pass"):
        return cfg.cross_entropy_impl
    from pallas_kernels.cross_entropy import _CHUNKED_MIN_LOGIT_BYTES

    tokens = train.global_batch_size // train.grad_accum_steps * train.seq_len  # upper bound per device
    return "single_pass" if 4 * tokens * cfg.vocab_size >= _CHUNKED_MIN_LOGIT_BYTES else "reference"


if __name__ == "__main__":
    from litespark_jax.cli import run_main

    sys.exit(run_main(main))
