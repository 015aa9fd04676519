# Environment shared by launch/slurm.sbatch and launch/jobset.yaml (both source this file).
# Every flag below is accepted by jaxlib 0.11.2 (an unknown XLA flag aborts the process at start-up).

# XLA: overlap the FSDP all-gathers / reduce-scatters and the data-parallel all-reduce with compute.
#  - latency_hiding_scheduler: schedules collectives asynchronously, next to independent compute.
#  - pipelined_{all_gather,reduce_scatter,all_reduce} + while_loop_double_buffering: inside the scanned layer stack,
#    gather layer i+1's weights (and reduce-scatter layer i+1's gradients) while layer i computes.
#  - *_combine_threshold_bytes=128 MiB: merge the many small per-parameter collectives (norm scales, biases) into
#    few large NCCL calls, which reach bus bandwidth.
#  - command buffers stay off (''): CUDA graphs around collectives have deadlocked multi-node NCCL runs.
export XLA_FLAGS="${XLA_FLAGS:-} \
 --xla_gpu_enable_latency_hiding_scheduler=true \
 --xla_gpu_enable_pipelined_all_gather=true \
 --xla_gpu_enable_pipelined_reduce_scatter=true \
 --xla_gpu_enable_pipelined_all_reduce=true \
 --xla_gpu_enable_while_loop_double_buffering=true \
 --xla_gpu_all_gather_combine_threshold_bytes=134217728 \
 --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728 \
 --xla_gpu_all_reduce_combine_threshold_bytes=134217728 \
 --xla_gpu_enable_command_buffer="

# JAX pre-allocates this fraction of each GPU (the planner's "usable" memory assumes 0.9; the default is 0.75).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

# NCCL: InfiniBand with GPUDirect RDMA between nodes, NVLink inside.
export NCCL_IB_DISABLE=0                 # use the IB/RoCE HCAs (one 400 Gb/s NIC per GPU on H100/H200 HGX)
export NCCL_NET_GDR_LEVEL=${NCCL_NET_GDR_LEVEL:-PHB}  # GPUDirect RDMA when GPU and NIC share a PCIe host bridge
export NCCL_CROSS_NIC=${NCCL_CROSS_NIC:-0}   # keep each ring on rail-aligned NICs (rail-optimized fabrics)
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}  # NVLink SHARP (multicast) off: not on every fabric, and it
                                              # reserves memory; see the cluster's KINDS/fabric notes
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Site-specific (uncomment and set): which HCAs and which interface carries the bootstrap traffic.
# export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7
# export NCCL_SOCKET_IFNAME=eth0

# LiteSpark: rendezvous and hang detection (litespark_jax/parallel/distributed.py, watchdog.py).
export LITESPARK_COORDINATOR_PORT=${LITESPARK_COORDINATOR_PORT:-12355}
export LITESPARK_INIT_TIMEOUT_S=${LITESPARK_INIT_TIMEOUT_S:-600}   # all nodes must join within 10 minutes
export LITESPARK_STEP_TIMEOUT_S=${LITESPARK_STEP_TIMEOUT_S:-1800}  # exit 75 when no step completes for 30 min
