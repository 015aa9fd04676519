"""Training: state, optimizer, the pure step and the loop (``python -m litespark_jax.train``)."""
