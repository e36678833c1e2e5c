"""The world's language as a standard CLIP BPE tokenizer, built offline.

CLIP's tokenizer is byte-level BPE: every byte has a base token (and an end-of-word `</w>` twin), and a ranked list
of merges joins them into words. Here the merges are learnt on the shapes world's own words (captions and edit
instructions), with plain BPE training until every world word is one token. Any other text still tokenizes (into
byte tokens), so a misspelt prompt degrades instead of failing.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from .world import TASKS, make_example

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 40  # the longest prompt of any task (3 objects, two-tone background) is 34 tokens with BOS/EOS
_WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")  # CLIP's pre-tokenizer, reduced to what the world writes
_SAMPLES_PER_TASK = 2000


def _byte_alphabet() -> list[str]:
    """CLIP's byte -> printable-unicode table (GPT-2's), in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def world_words() -> Counter:
    """Word counts over the first examples of every task's train split (deterministic)."""
    counts: Counter = Counter()
    for task in TASKS:
        for index in range(_SAMPLES_PER_TASK):
            counts.update(_WORD.findall(make_example(task, "train", index).prompt.lower()))
    return counts


def learn_merges(words: Counter) -> list[tuple[str, str]]:
    """Plain BPE training: merge the most frequent adjacent pair (ties: alphabetical) until every word is one symbol.
    Applying the merges by rank (as CLIPTokenizer does) then reproduces each training word as a single token."""
    spelt = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in spelt.values()):
        pairs: Counter = Counter()
        for word, symbols in spelt.items():
            for pair in zip(symbols[:-1], symbols[1:], strict=True):
                pairs[pair] += words[word]
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        spelt = {w: _merge(s, best) for w, s in spelt.items()}
    return merges


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def write_tokenizer_files(path: Path) -> tuple[Path, Path]:
    """Write `vocab.json` and `merges.txt` for the world's language into `path`; return both paths."""
    path.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(world_words())
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab_file, merges_file = path / "vocab.json", path / "merges.txt"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_file, merges_file


def world_tokenizer(path: Path):
    """A `CLIPTokenizer` for the world's language, its files written to `path` (the pipeline saves its own copy)."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_tokenizer_files(path)
    return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=MAX_LENGTH, pad_token=EOS)
