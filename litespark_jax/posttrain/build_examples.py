"""Build the bundled SFT and DPO example datasets from the bundled corpus (``litespark_jax/data/corpus/pycorpus``).

    python -m litespark_jax.posttrain.build_examples [--out DIR]

Source: the ``PythonDocs`` documents (reStructuredText of the Python 3.11 docs, PSF license) of the corpus's train
split (train files) and validation split (eval files), so train and eval come from disjoint pages.

- Every section heading (a title line underlined with ``= - ~ ^ * +``) whose following prose (directives, code
  blocks and markup lines dropped, whitespace collapsed) has at least 80 characters becomes a question/answer:
  the prompt asks what the section of that page says, the answer is its first prose, cut at a sentence (or word)
  end to at most ``SFT_MAX_CHARS`` / ``DPO_MAX_CHARS`` characters. Duplicate (page, title) pairs are skipped.
- SFT (``sft_train.jsonl``, ``sft_eval.jsonl``): in a fixed seeded order, a third of the examples are chat
  ``messages`` with a system turn, a third chat ``messages`` without one, a third ``prompt``/``completion``.
- DPO (``dpo_train.jsonl``, ``dpo_eval.jsonl``): ``chosen`` is the section's real answer, ``rejected`` the answer of
  another section drawn by a seeded derangement of the answers (a real but wrong answer), so the preference is
  "answers the question asked".

Deterministic (seed 0): running it again rewrites identical files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re

from litespark_jax.cli import ArgumentParser
from litespark_jax.data.config import CORPUS_DIR
from litespark_jax.data.sources import read_bytes

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples")
SFT_MAX_CHARS = 400
DPO_MAX_CHARS = 200
MIN_CHARS = 80
MAX_SECTIONS_PER_PAGE = 6
SYSTEM = "You answer questions about the Python documentation."
_UNDERLINE = re.compile(r"^([=\-~^*+#])\1{2,}\s*$")
_ROLE = re.compile(r":[a-z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")


def _documents(split: str):
    folder = os.path.join(CORPUS_DIR, split)
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name.endswith(".jsonl.zst") or name.endswith(".jsonl"):
                for line in read_bytes(os.path.join(root, name)).decode("utf-8").splitlines():
                    doc = json.loads(line)
                    if doc.get("meta", {}).get("redpajama_set_name") == "PythonDocs":
                        yield doc["meta"].get("source", "unknown"), doc["text"]


def _clean(text: str) -> str:
    text = _ROLE.sub(r"\1", text)
    text = text.replace("``", "").replace("**", "").replace("`", "")
    return " ".join(text.split())


def _prose(lines: list[str]) -> str:
    """The first paragraphs of plain prose: no directives, indented blocks, tables or list markup noise."""
    out, skipping = [], False
    for line in lines:
        if line.startswith(".. ") or line.rstrip().endswith("::") and not line.strip()[:-2]:
            skipping = True
            continue
        if skipping and (not line.strip() or line.startswith((" ", "\t"))):
            continue
        skipping = False
        if line.startswith((" ", "\t", "+", "|", "=", ">>>")) or _UNDERLINE.match(line):
            continue
        out.append(line)
    return _clean("\n".join(out).replace("::", ":"))


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = text[:limit]
    end = max(head.rfind(". "), head.rfind("? "), head.rfind("! "))
    if end >= limit // 3:
        return head[:end + 1]
    return head[:head.rfind(" ")].rstrip(",;:") + " ..."


def sections(split: str) -> list[dict]:
    """(page, title, prose) of every usable section of the split's PythonDocs pages."""
    found, seen = [], set()
    for source, text in _documents(split):
        page = source.removesuffix(".rst.txt").removesuffix(".txt")
        lines = text.splitlines()
        heads = [i for i in range(1, len(lines)) if _UNDERLINE.match(lines[i]) and lines[i - 1].strip()
                 and len(lines[i].strip()) >= len(lines[i - 1].strip())]
        per_page = 0
        for k, i in enumerate(heads):
            title = _clean(lines[i - 1])
            body_end = heads[k + 1] - 1 if k + 1 < len(heads) else len(lines)
            prose = _prose(lines[i + 1:body_end])
            key = (page, title)
            if len(prose) < MIN_CHARS or key in seen or not title or per_page >= MAX_SECTIONS_PER_PAGE:
                continue
            seen.add(key)
            per_page += 1
            found.append({"page": page, "title": title, "prose": prose})
    return found


def question(section: dict) -> str:
    return f'What does the section "{section["title"]}" of the Python documentation page {section["page"]} say?'


def sft_examples(found: list[dict], seed: int) -> list[dict]:
    rng = random.Random(seed)
    order = list(range(len(found)))
    rng.shuffle(order)
    out = []
    for n, i in enumerate(order):
        s = found[i]
        answer = _cut(s["prose"], SFT_MAX_CHARS)
        if n % 3 == 0:
            out.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question(s)},
                                     {"role": "assistant", "content": answer}]})
        elif n % 3 == 1:
            out.append({"messages": [{"role": "user", "content": question(s)},
                                     {"role": "assistant", "content": answer}]})
        else:
            out.append({"prompt": question(s), "completion": answer})
    return out


def dpo_pairs(found: list[dict], seed: int) -> list[dict]:
    rng = random.Random(seed + 1)
    answers = [_cut(s["prose"], DPO_MAX_CHARS) for s in found]
    order = list(range(len(found)))
    rng.shuffle(order)
    # A derangement (a rotation of a random order): every rejected answer belongs to another section.
    wrong = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}
    out = []
    for i in order:
        if answers[wrong[i]] == answers[i]:
            continue
        out.append({"prompt": question(found[i]), "chosen": answers[i], "rejected": answers[wrong[i]]})
    return out


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build(out_dir: str = OUT_DIR, *, max_train: int = 480, max_dpo_train: int = 256, seed: int = 0) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    train, evaluation = sections("train"), sections("validation")
    files = {
        "sft_train.jsonl": sft_examples(train, seed)[:max_train],
        "sft_eval.jsonl": sft_examples(evaluation, seed),
        "dpo_train.jsonl": dpo_pairs(train, seed)[:max_dpo_train],
        "dpo_eval.jsonl": dpo_pairs(evaluation, seed),
    }
    for name, rows in files.items():
        write_jsonl(os.path.join(out_dir, name), rows)
    return {name: len(rows) for name, rows in files.items()}


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m litespark_jax.posttrain.build_examples", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=OUT_DIR, help="output directory (default: the bundled examples)")
    args = parser.parse_args(argv)
    for name, count in build(args.out).items():
        size = os.path.getsize(os.path.join(args.out, name))
        print(f"{name}: {count} lines, {size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
