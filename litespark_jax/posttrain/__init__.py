"""Post-training on the pretraining stack: supervised fine-tuning (SFT) and direct preference optimization (DPO).

``config``: the ``posttrain:`` YAML section. ``template``: chat templates with special tokens. ``sft_data`` /
``dpo_data``: JSONL readers, tokenization and packing as grain transforms. ``dpo_loss``: the DPO/IPO objective
and its train step. ``trainer``: ``SFTTrainer`` / ``DPOTrainer``, the pretraining ``Trainer`` with other data and
another step. ``build_examples``: how the bundled example datasets were made. ``bench``: tokens/s of both.

This package must stay importable from ``litespark_jax.config`` (it only needs ``posttrain.config`` there), so
nothing here is imported eagerly.
"""
