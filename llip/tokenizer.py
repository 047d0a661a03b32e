"""The CLIP BPE tokenizer, rebuilt on the ``tokenizers`` library from CLIP's merges file.

CLIP's scheme: lower-cased text, split into words by a regex (letters runs, single digits, punctuation runs,
English contractions), each word's UTF-8 bytes mapped to printable characters (the GPT-2 byte alphabet), BPE
with a ``</w>`` end-of-word suffix, then ``<start_of_text>`` (49406) + ids + ``<end_of_text>`` (49407), padded
with 0 to the context length. Too-long texts are cut and keep the end token last (the text tower pools there).

The merges file ``bpe_simple_vocab_16e6.txt.gz`` is looked up in ``$LLIP_BPE_VOCAB``, then ``llip/assets/``,
then the installed ``open_clip`` package (found without importing it: its import pulls torchvision).
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
import unicodedata
from pathlib import Path

import torch

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
SOT_ID = 49406  # <start_of_text>
EOT_ID = 49407  # <end_of_text>; the largest id, which the text tower's argmax pooling relies on
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894 merges: 512 byte tokens + merges + 2 specials = 49408
# Word split of CLIP (applied after lower-casing): contractions, letter runs, single digits, other non-space runs.
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _byte_chars() -> dict[int, str]:
    """byte -> the character standing for it, in CLIP's vocabulary order (the dict's order): the printable
    Latin-1 bytes map to themselves and come first, the other bytes to chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    for n, b in enumerate([b for b in range(256) if b not in chars]):
        chars[b] = chr(256 + n)
    return chars


def find_vocab_file() -> Path:
    """Path of CLIP's merges file; raises FileNotFoundError saying where it looked and how to get it."""
    tried = []
    env = os.environ.get("LLIP_BPE_VOCAB")
    if env:
        tried.append(Path(env))
    tried.append(Path(__file__).parent / "assets" / VOCAB_FILE)
    spec = importlib.util.find_spec("open_clip")  # locates the package without running its __init__
    if spec is not None and spec.submodule_search_locations:
        tried += [Path(p) / VOCAB_FILE for p in spec.submodule_search_locations]
    for p in tried:
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"CLIP BPE vocabulary {VOCAB_FILE} not found (looked in: {', '.join(map(str, tried))}). Install it with "
        f"`pip install --no-deps open_clip_torch==3.3.0` or point $LLIP_BPE_VOCAB at the file."
    )


@functools.cache
def _build(path: str):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES]]  # line 0 is a version header
    alphabet = list(_byte_chars().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<start_of_text>", "<end_of_text>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or vocab["<end_of_text>"] != EOT_ID:
        raise RuntimeError(f"{path} does not give CLIP's {VOCAB_SIZE}-token vocabulary (got {len(vocab)})")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),  # keep the matches only
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> CLIP's byte alphabet
        ]
    )
    return tok, tokens


def clean(text: str) -> str:
    """CLIP's text clean-up without ftfy: unescape HTML twice, NFC, collapse whitespace, strip, lower-case."""
    text = unicodedata.normalize("NFC", html.unescape(html.unescape(text)))
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """``tokenizer(texts) -> LongTensor [N, context_length]`` (a single string gives N = 1)."""

    def __init__(self, context_length: int = 77):
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length must be an int >= 2 (start and end tokens), got {context_length!r}")
        self.context_length = context_length
        self.vocab_size = VOCAB_SIZE
        self._tok, self._id_to_token = _build(str(find_vocab_file()))
        self._byte_of = {c: b for b, c in _byte_chars().items()}

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without start/end tokens, padding or truncation."""
        return self._tok.encode(clean(text)).ids

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a string or a list of strings")
        L = self.context_length
        out = torch.zeros(len(texts), L, dtype=torch.long)
        for row, enc in enumerate(self._tok.encode_batch([clean(t) for t in texts])):
            ids = [SOT_ID, *enc.ids[: L - 2], EOT_ID]  # truncation keeps the end token last
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids) -> str:
        """Text of one row of ids: what lies between the start token and the end token (or the row's end)."""
        ids = [int(i) for i in ids]
        if ids and ids[0] == SOT_ID:
            ids = ids[1:]
        if EOT_ID in ids:
            ids = ids[: ids.index(EOT_ID)]
        words = "".join(self._id_to_token[i] for i in ids).split("</w>")
        return " ".join(bytes(self._byte_of[c] for c in w).decode("utf-8", errors="replace") for w in words).strip()


def get_tokenizer(context_length: int = 77, *, file: str | os.PathLike | None = None):
    """The CLIP BPE tokenizer padding / truncating to ``context_length`` (use the model's ``context_length``), or
    with ``file`` the Hugging Face ``tokenizer.json`` there, as open_clip uses SigLIP's (llip/file_tokenizer.py)."""
    if file is not None:
        from .file_tokenizer import FileTokenizer

        return FileTokenizer(str(file), context_length)
    return ClipTokenizer(context_length)


def tokenizer_for(config):
    """The tokenizer a model of ``config`` (a :class:`~llip.configs.ModelConfig`) reads: its ``tokenizer`` field,
    at its context length; raises ValueError when the model needs a file it was not given or the vocabulary does
    not fit the model's token table."""
    if config.tokenizer == "clip-bpe":
        tokenizer = get_tokenizer(config.context_length)
    elif not config.tokenizer:
        raise ValueError(
            f"{config.name} reads SigLIP's sentencepiece vocabulary, which llip cannot ship: set the model's "
            "tokenizer to its tokenizer.json (Hugging Face repo timm/ViT-B-16-SigLIP), e.g. --set tokenizer=PATH"
        )
    else:
        tokenizer = get_tokenizer(config.context_length, file=config.tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"tokenizer {config.tokenizer!r} has {tokenizer.vocab_size} tokens, more than {config.name}'s "
            f"vocab_size {config.vocab_size}"
        )
    return tokenizer
