"""CLIP's tokenizer without transformers: a pipeline folder's `tokenizer/` (vocab.json, merges.txt,
tokenizer_config.json, special_tokens_map.json) turned into int64 ids exactly as
`transformers.CLIPTokenizer(...)(prompts, padding="max_length", max_length=model_max_length, truncation=True)` makes
them, with the `tokenizers` package doing the byte-level BPE.

transformers' slow CLIPTokenizer (what diffusers pipelines load) cleans text with ftfy when that is installed and
otherwise with its BasicTokenizer; this reproduces the second (ftfy is not a dependency here): control characters
dropped, whitespace collapsed, CJK ideographs split off, NFC, lower case. Every special token (the pad token too,
which SD 2.x folders set to "!") is matched in the text before BPE, as transformers does.

Must not import torch, transformers or diffusers, even indirectly: this runs where only numpy and tokenizers are.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, pre_tokenizers, processors
from tokenizers.models import BPE

# CLIP's pre-tokenizer: contractions, letter runs, single digits, runs of anything else (whitespace dropped)
CLIP_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
MAX_MERGES = 49152 - 256 - 2  # CLIPTokenizer reads no more merges than CLIP's own vocabulary holds
SPECIAL_TOKEN_DEFAULTS = {  # CLIPTokenizer's defaults, used where a folder names none
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
_NO_MAX_LENGTH = 10**6  # transformers stores 1e30 when a folder has no model_max_length


# --- text cleanup, as transformers' BasicTokenizer(strip_accents=False, do_split_on_punc=False) ------------------


def _is_control(char: str) -> bool:
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def _is_whitespace(char: str) -> bool:
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def _is_cjk_ideograph(char: str) -> bool:
    """The CJK Unified Ideograph blocks, which BERT's cleanup (and so CLIPTokenizer's) spaces apart."""
    cp = ord(char)
    blocks = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F))
    blocks += ((0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
    return any(low <= cp <= high for low, high in blocks)


def clean_text(text: str) -> str:
    """Drop NUL, U+FFFD and control characters; space out CJK ideographs; NFC; lower-case; single spaces."""
    chars = []
    for char in text:
        if char in "\x00\ufffd" or _is_control(char):
            continue
        if _is_whitespace(char):
            chars.append(" ")
        else:
            chars.append(f" {char} " if _is_cjk_ideograph(char) else char)
    return " ".join(word.lower() for word in unicodedata.normalize("NFC", "".join(chars)).split())


# --- the folder --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _content(token: str | Mapping[str, Any] | None) -> str | None:
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    return token.get("content") if isinstance(token, Mapping) else token


def _special_tokens(config: Mapping[str, Any], special_map: Mapping[str, Any]) -> dict[str, str | None]:
    """transformers' precedence: tokenizer_config.json, overridden by special_tokens_map.json only in folders
    written before `added_tokens_decoder` existed."""
    tokens = {key: _content(config.get(key, default)) for key, default in SPECIAL_TOKEN_DEFAULTS.items()}
    if "added_tokens_decoder" not in config:
        tokens |= {key: _content(value) for key, value in special_map.items() if key in SPECIAL_TOKEN_DEFAULTS}
    return tokens


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """As CLIPTokenizer reads them: the first line is a header (skipped unread), at most MAX_MERGES after it."""
    lines = path.read_text(encoding="utf-8").strip().split("\n")[1 : MAX_MERGES + 1]
    return [tuple(line.split()) for line in lines]


def _check_config(folder: Path, config: Mapping[str, Any]) -> int:
    """The model_max_length, after refusing what this tokenizer does not reproduce."""
    problems = []
    if config.get("tokenizer_class", "CLIPTokenizer") not in ("CLIPTokenizer", "CLIPTokenizerFast"):
        problems.append(f"tokenizer_class {config['tokenizer_class']!r} (supported: CLIPTokenizer)")
    for side in ("padding_side", "truncation_side"):
        if config.get(side, "right") != "right":
            problems.append(f"{side}={config[side]!r} (supported: 'right')")
    max_length = config.get("model_max_length")
    if not isinstance(max_length, int) or max_length >= _NO_MAX_LENGTH:
        problems.append(f"model_max_length={max_length!r} (expected the text encoder's length, e.g. 77)")
    if problems:
        raise ValueError(f"tokenizer in {folder} not supported by the on-device runtime: {'; '.join(problems)}")
    return max_length


def _added_tokens(folder: Path, config: Mapping[str, Any], vocab: Mapping[str, int]) -> list[str]:
    """Tokens transformers matches in the text before BPE (all special in CLIP folders); each must be in vocab.json
    already, since ids past the vocabulary (textual-inversion tokens) would need the text encoder to know them."""
    declared = {int(i): _content(t) for i, t in config.get("added_tokens_decoder", {}).items()}
    declared |= {i: t for t, i in _read_json(folder / "added_tokens.json").items()}
    foreign = [f"{t!r} (id {i})" for i, t in sorted(declared.items()) if vocab.get(t) != i]
    if foreign:
        raise ValueError(
            f"tokenizer in {folder} has added tokens outside vocab.json: {', '.join(foreign)}; "
            "the on-device runtime supports only the vocabulary's own tokens"
        )
    return list(declared.values())


class ClipTokenizer:
    """CLIP BPE tokenizer; `encode(prompts)` gives (B, model_max_length) int64 ids: BOS, tokens, EOS, then pad."""

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        model_max_length: int,
        special_tokens: Mapping[str, str | None] = SPECIAL_TOKEN_DEFAULTS,
        added_tokens: Sequence[str] = (),
    ) -> None:
        specials = dict(SPECIAL_TOKEN_DEFAULTS) | dict(special_tokens)
        missing = [f"{key}={token!r}" for key, token in specials.items() if token not in vocab]
        if missing:
            raise ValueError(f"CLIP special tokens not in vocab.json: {', '.join(missing)}")
        self.model_max_length = model_max_length
        self.bos_token_id, self.eos_token_id = vocab[specials["bos_token"]], vocab[specials["eos_token"]]
        self.pad_token_id = vocab[specials["pad_token"]]
        self._tokenizer = self._build(vocab, merges, specials, added_tokens)

    def _build(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        specials: Mapping[str, str],
        added_tokens: Sequence[str],
    ) -> Tokenizer:
        bpe = BPE(
            vocab=dict(vocab),
            merges=list(merges),
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",  # CLIP marks a word's last symbol, not a continuation
            unk_token=specials["unk_token"],
            fuse_unk=False,
        )
        tokenizer = Tokenizer(bpe)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(CLIP_WORD_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> printable symbols
            ]
        )
        # normalized=False: the text is cleaned before it gets here (`clean_text`), as transformers does
        matched = dict.fromkeys([*specials.values(), *added_tokens])  # ordered, unique
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in matched])
        bos, eos = specials["bos_token"], specials["eos_token"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", special_tokens=[(bos, self.bos_token_id), (eos, self.eos_token_id)]
        )
        tokenizer.enable_truncation(self.model_max_length)  # counts BOS and EOS, as transformers does
        tokenizer.enable_padding(
            length=self.model_max_length, pad_id=self.pad_token_id, pad_token=specials["pad_token"]
        )
        return tokenizer

    @classmethod
    def from_folder(cls, folder: Path | str) -> ClipTokenizer:
        """From a pipeline's `tokenizer/` folder (the one `CLIPTokenizer.from_pretrained` reads)."""
        folder = Path(folder)
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise ValueError(f"no {name} in {folder}; expected a CLIP tokenizer folder (vocab.json, merges.txt)")
        config = _read_json(folder / "tokenizer_config.json")
        vocab = _read_json(folder / "vocab.json")
        specials = _special_tokens(config, _read_json(folder / "special_tokens_map.json"))
        return cls(
            vocab,
            _read_merges(folder / "merges.txt"),
            _check_config(folder, config),
            specials,
            _added_tokens(folder, config, vocab),
        )

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """(B, model_max_length) int64 token ids: truncated to fit BOS and EOS, padded with the pad token."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts; wrap a single prompt in a list")
        encodings = self._tokenizer.encode_batch([clean_text(p) for p in prompts])
        return np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(prompts), self.model_max_length)
