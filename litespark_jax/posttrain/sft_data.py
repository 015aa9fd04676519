"""SFT data: JSONL conversations -> templated token ids -> fitted to the window -> packed [batch, seq] batches.

Each line is one example, either ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
or ``{"prompt": "...", "completion": "..."}`` (read as one user turn and one assistant turn).

The steps are grain transforms (``RenderConversation``, ``FitWindow``, ``ToSequence``), applied in one eager pass
over the file when a run starts, so a bad line fails the run at once with its file and line number and every
truncated or dropped example is counted (``SFTStats``) before training; grain then shuffles (a new order each
epoch), packs (first-fit, several conversations per window, ``segment_ids`` 1, 2, ... with positions restarting
at 0 and 0 for padding) and batches. Batches are the pretraining batch dict, so the pretraining train step runs
SFT unchanged: ``loss_mask`` is 1 only where the target token is an assistant token.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator

import grain
import numpy as np
from grain.experimental import FirstFitPackIterDataset

from litespark_jax.errors import DataError

FEATURES = ("inputs", "targets", "loss_mask")


def read_jsonl(path: str) -> Iterator[tuple[str, dict]]:
    """(``file:line``, object) for every non-blank line; DataError for a missing file or a line that is not UTF-8
    JSON. Lines are decoded one at a time so a bad byte is reported with its file and line."""
    if not os.path.isfile(path):
        raise DataError(f"data file {path} does not exist")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: invalid UTF-8 at byte {e.start}") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
            yield where, obj


def conversation(obj: dict, where: str) -> list[dict]:
    """The messages of one SFT line (chat ``messages`` or a ``prompt``/``completion`` pair)."""
    if "messages" in obj:
        return obj["messages"]
    if "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise DataError(f"{where}: '{key}' must be a non-empty string")
        return [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
    raise DataError(f"{where}: an SFT line needs 'messages' or 'prompt' and 'completion' (has {sorted(obj)})")


@dataclasses.dataclass
class SFTStats:
    """What happened to the examples of one file (reported at start and kept in ``SFTData.stats``)."""

    examples: int = 0
    """Lines read."""
    kept: int = 0
    """Examples that go into training."""
    truncated: int = 0
    """Examples longer than the window whose end was cut (truncation=truncate)."""
    dropped_too_long: int = 0
    """Examples longer than the window that were skipped (truncation=drop)."""
    dropped_no_target: int = 0
    """Truncated examples left with no assistant token inside the window (skipped: they would train nothing)."""
    tokens_cut: int = 0
    """Tokens removed from the truncated (kept) examples."""
    target_tokens: int = 0
    """Assistant tokens trained on per epoch."""

    def summary(self) -> str:
        return (f"{self.examples} examples, {self.kept} kept, {self.truncated} truncated ({self.tokens_cut} tokens "
                f"cut), {self.dropped_too_long} dropped as too long, {self.dropped_no_target} dropped with no "
                f"assistant token left; {self.target_tokens} target tokens per epoch")


class RenderConversation(grain.transforms.Map):
    """{"where", "messages"} -> {"where", "tokens", "target"} through a chat template."""

    def __init__(self, template_tokens):
        self.tt = template_tokens

    def map(self, element):
        tokens, target = self.tt.render(element["messages"], where=element["where"])
        return {"where": element["where"], "tokens": tokens, "target": target}


class FitWindow(grain.transforms.Map):
    """Make an example fit ``seq_len`` predictions (``seq_len + 1`` tokens): cut it, mark it dropped, or raise.

    Returns the element with ``status`` set to ok / truncated / dropped_too_long / dropped_no_target and counts it
    in ``stats``."""

    def __init__(self, seq_len: int, truncation: str, stats: SFTStats | None = None):
        self.max_tokens = seq_len + 1
        self.truncation = truncation
        self.stats = stats if stats is not None else SFTStats()

    def map(self, element):
        tokens, target = element["tokens"], element["target"]
        s = self.stats
        s.examples += 1
        status = "ok"
        if len(tokens) > self.max_tokens:
            if self.truncation == "error":
                raise DataError(f"{element['where']}: the example has {len(tokens)} tokens, more than the window "
                                f"of {self.max_tokens} (train.seq_len + 1); set posttrain.truncation=truncate or "
                                f"drop, or a longer train.seq_len")
            if self.truncation == "drop":
                s.dropped_too_long += 1
                return {**element, "status": "dropped_too_long"}
            cut = len(tokens) - self.max_tokens
            tokens, target = tokens[:self.max_tokens], target[:self.max_tokens]
            status = "truncated"
        if not any(target[1:]):
            s.dropped_no_target += 1
            return {**element, "status": "dropped_no_target"}
        if status == "truncated":
            s.truncated += 1
            s.tokens_cut += cut
        s.kept += 1
        s.target_tokens += sum(target[1:])
        return {**element, "tokens": tokens, "target": target, "status": status}


class ToSequence(grain.transforms.Map):
    """Tokens -> next-token arrays: inputs = tokens[:-1], targets = tokens[1:], loss_mask = target[1:]."""

    def map(self, element):
        tokens = np.asarray(element["tokens"], np.int32)
        return {"inputs": tokens[:-1], "targets": tokens[1:],
                "loss_mask": np.asarray(element["target"][1:], np.int32)}


def prepare_sft(path: str, template_tokens, seq_len: int, truncation: str) -> tuple[list[dict], SFTStats]:
    """Every example of ``path`` as unpadded next-token arrays, and what fitting them to the window did."""
    render, fit, to_seq = RenderConversation(template_tokens), FitWindow(seq_len, truncation), ToSequence()
    examples = []
    for where, obj in read_jsonl(path):
        element = fit.map(render.map({"where": where, "messages": conversation(obj, where)}))
        if element["status"] in ("ok", "truncated"):
            examples.append(to_seq.map(element))
    if not examples:
        raise DataError(f"{path}: no usable SFT example ({fit.stats.summary()})")
    return examples, fit.stats


def pad_example(example: dict, seq_len: int) -> dict:
    """One example alone in a row: padded to ``seq_len`` with segment id 0, positions 0.. for its tokens."""
    n = len(example["inputs"])
    row = {k: np.zeros(seq_len, np.int32) for k in (*FEATURES, "positions", "segment_ids")}
    for k in FEATURES:
        row[k][:n] = example[k]
    row["positions"][:n] = np.arange(n)
    row["segment_ids"][:n] = 1
    return row


def _rename_packed(element: dict) -> dict:
    return {"inputs": element["inputs"], "targets": element["targets"], "loss_mask": element["loss_mask"],
            "positions": element["inputs_positions"].astype(np.int32),
            "segment_ids": element["inputs_segment_ids"].astype(np.int32)}


def sft_dataset(examples: list[dict], *, seq_len: int, batch_size: int, seed: int, pack: bool = True,
                packing_bins: int = 16, repeat: bool = True, shard_index: int = 0,
                shard_count: int = 1) -> grain.IterDataset:
    """grain pipeline: shard -> shuffle (new order each epoch) -> repeat -> pack or pad -> batch ``batch_size``."""
    ds = grain.MapDataset.source(examples[shard_index::shard_count])
    if repeat:
        ds = ds.shuffle(seed=seed).repeat()
    if pack:
        it = FirstFitPackIterDataset(ds.to_iter_dataset(), length_struct={k: seq_len for k in FEATURES},
                                     num_packing_bins=packing_bins, seed=seed, shuffle_bins=repeat)
        it = it.map(_rename_packed)
    else:
        it = ds.map(lambda e: pad_example(e, seq_len)).to_iter_dataset()
    return it.batch(batch_size, drop_remainder=repeat)
