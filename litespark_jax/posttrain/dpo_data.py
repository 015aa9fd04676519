"""DPO data: JSONL preference pairs -> (chosen, rejected) rows sharing one templated prompt.

Each line is ``{"prompt": "..." or [messages], "chosen": "...", "rejected": "..."}``. The prompt is rendered as a
conversation (a string is one user turn) followed by the assistant header; each response is the assistant's
content plus the end-of-turn token, and only response tokens are in ``loss_mask``.

A batch of P pairs is 2P rows [2P, seq]: row 2i is pair i's chosen, row 2i+1 its rejected, one sequence per row
(padded, segment id 1, positions from 0), plus ``ref_logps`` [2P, seq]: the reference model's per-token log-prob of
each target (0 where masked) when precomputed, else zeros that the trainer fills every step.

Too long (prompt + longer response > seq_len + 1 tokens): ``truncate`` keeps the end of the prompt (at least half
the window when the prompt is that long) and then cuts the responses' ends; ``drop`` skips the pair; ``error``
raises. All are counted in ``DPOStats``. A pair whose responses are the same once cut (a shared prefix longer
than the room left) is dropped and counted: it would train nothing (loss log 2, zero gradient).
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from litespark_jax.errors import DataError
from litespark_jax.posttrain.sft_data import read_jsonl

ROW_FEATURES = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


@dataclasses.dataclass
class DPOStats:
    pairs: int = 0
    """Lines read."""
    kept: int = 0
    truncated: int = 0
    """Pairs whose prompt start and/or response ends were cut (truncation=truncate)."""
    dropped_too_long: int = 0
    """Pairs skipped as too long (truncation=drop)."""
    dropped_identical: int = 0
    """Truncated pairs skipped because cutting made chosen and rejected identical."""
    tokens_cut: int = 0
    """Tokens removed from the truncated (kept) pairs."""

    def summary(self) -> str:
        return (f"{self.pairs} pairs, {self.kept} kept, {self.truncated} truncated ({self.tokens_cut} tokens cut), "
                f"{self.dropped_too_long} dropped as too long, {self.dropped_identical} dropped as identical "
                f"after truncation")


def prompt_messages(obj: dict, where: str) -> list[dict]:
    prompt = obj.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: 'prompt' is empty")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt:
        return prompt
    raise DataError(f"{where}: 'prompt' must be a non-empty string or a list of messages")


def tokenize_pair(obj: dict, where: str, template_tokens) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids ending with the assistant header, chosen ids + end-of-turn, rejected ids + end-of-turn)."""
    missing = [key for key in ("prompt", "chosen", "rejected") if key not in obj]
    if missing:
        raise DataError(f"{where}: a DPO line needs 'prompt', 'chosen' and 'rejected' (has {sorted(obj)})")
    for key in ("chosen", "rejected"):
        value = obj.get(key)
        if not isinstance(value, str):
            raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
        if not value.strip():
            raise DataError(f"{where}: the '{key}' side of the pair is empty")
    if obj["chosen"] == obj["rejected"]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical (the pair prefers nothing)")
    tt = template_tokens
    prompt, _ = tt.render(prompt_messages(obj, where), where=where, require_assistant=False)
    prompt = prompt + tt.generation_prompt()
    eot = tt.special_ids[tt.template.end_of_turn]
    return prompt, tt._text(obj["chosen"]) + [eot], tt._text(obj["rejected"]) + [eot]


def fit_pair(prompt, chosen, rejected, seq_len: int, truncation: str, stats: DPOStats, where: str):
    """The pair cut to ``seq_len + 1`` tokens per side, or None when dropped (too long under truncation=drop, or
    its responses identical once cut)."""
    budget = seq_len + 1
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= budget:
        return prompt, chosen, rejected
    if truncation == "error":
        raise DataError(f"{where}: the pair has {len(prompt) + longest} tokens (prompt {len(prompt)} + longest "
                        f"response {longest}), more than the window of {budget} (train.seq_len + 1); set "
                        f"posttrain.truncation=truncate or drop, or a longer train.seq_len")
    if truncation == "drop":
        stats.dropped_too_long += 1
        return None
    keep = max(budget - longest, min(len(prompt), budget // 2))
    before = len(prompt) + len(chosen) + len(rejected)
    prompt = prompt[len(prompt) - keep:]
    room = budget - len(prompt)
    chosen, rejected = chosen[:room], rejected[:room]
    if chosen == rejected:
        stats.dropped_identical += 1
        return None
    stats.truncated += 1
    stats.tokens_cut += before - len(prompt) - len(chosen) - len(rejected)
    return prompt, chosen, rejected


def sequence_row(prompt: list[int], response: list[int], seq_len: int) -> dict:
    """One padded row: next-token arrays of prompt + response, loss on the response's tokens only."""
    tokens = np.asarray(prompt + response, np.int32)
    target = np.asarray([0] * len(prompt) + [1] * len(response), np.int32)
    n = len(tokens) - 1
    row = {k: np.zeros(seq_len, np.int32) for k in ROW_FEATURES}
    row["inputs"][:n], row["targets"][:n], row["loss_mask"][:n] = tokens[:-1], tokens[1:], target[1:]
    row["positions"][:n] = np.arange(n)
    row["segment_ids"][:n] = 1
    row["ref_logps"] = np.zeros(seq_len, np.float32)
    return row


def prepare_dpo(path: str, template_tokens, seq_len: int, truncation: str) -> tuple[list[dict], DPOStats]:
    """Every pair of ``path`` as {"chosen": row, "rejected": row}, and what fitting them to the window did."""
    stats, pairs = DPOStats(), []
    for where, obj in read_jsonl(path):
        stats.pairs += 1
        fitted = fit_pair(*tokenize_pair(obj, where, template_tokens), seq_len, truncation, stats, where)
        if fitted is None:
            continue
        prompt, chosen, rejected = fitted
        stats.kept += 1
        pairs.append({"chosen": sequence_row(prompt, chosen, seq_len),
                      "rejected": sequence_row(prompt, rejected, seq_len)})
    if not pairs:
        raise DataError(f"{path}: no usable preference pair ({stats.summary()})")
    return pairs, stats


def interleave(batch: dict) -> dict:
    """{"chosen": {k: [P, S]}, "rejected": {...}} -> {k: [2P, S]} with chosen rows even, rejected rows odd."""
    return {k: np.stack([batch["chosen"][k], batch["rejected"][k]], axis=1).reshape(-1, *batch["chosen"][k].shape[1:])
            for k in batch["chosen"]}


def dpo_dataset(pairs: list[dict], *, pairs_per_batch: int, seed: int, repeat: bool = True, shard_index: int = 0,
                shard_count: int = 1) -> grain.IterDataset:
    """grain pipeline: shard -> shuffle (new order each epoch) -> repeat -> batch pairs -> interleave rows."""
    ds = grain.MapDataset.source(pairs[shard_index::shard_count])
    if repeat:
        ds = ds.shuffle(seed=seed).repeat()
    return ds.batch(pairs_per_batch, drop_remainder=repeat).map(interleave).to_iter_dataset()
