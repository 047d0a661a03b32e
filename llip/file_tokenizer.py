"""A tokenizer read from a Hugging Face ``tokenizer.json``, used as open_clip uses SigLIP's.

SigLIP's text tower reads its sentencepiece vocabulary (``timm/ViT-B-16-SigLIP`` on the Hugging Face hub: 32,000
tokens), which llip cannot ship or download; a user who has SigLIP's weights has the file too. open_clip tokenizes
for SigLIP as follows, and so does :class:`FileTokenizer`:

- clean-up ("canonicalize", from big_vision's prompt engineering): HTML entities unescaped twice, NFC, every ``_``
  a space, ASCII punctuation removed, lower case, whitespace runs collapsed and stripped (open_clip also runs ftfy;
  we do not, as for CLIP's tokenizer: it changes only mis-encoded text);
- the tokenizer's own pipeline, its end-of-sequence token appended by its post-processor;
- cut to the context length keeping the special tokens, padded on the right with the pad token to exactly that
  length: SigLIP's text tower pools the last position, so the pad id matters. It comes from the file's padding
  section, or from ``tokenizer_config.json`` / ``special_tokens_map.json`` beside it (SigLIP's: ``</s>``, id 1,
  as big_vision trained with); a tokenizer that names none is refused.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from .tokenizer import clean

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize(text: str) -> str:
    """SigLIP's caption clean-up (see the module docstring): CLIP's clean-up, then ``_`` as a space and no ASCII
    punctuation."""
    return " ".join(clean(text).replace("_", " ").translate(_PUNCTUATION).split())


def _pad_token(folder: Path) -> str | None:
    """The pad token named by the Hugging Face config files of ``folder``, if any."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            pad = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
            if isinstance(pad, dict):  # {"content": "</s>", ...}
                pad = pad.get("content")
            if isinstance(pad, str):
                return pad
    return None


class FileTokenizer:
    """``tokenizer(texts) -> LongTensor [N, context_length]`` from ``file``: a ``tokenizer.json`` or the folder
    holding it (a Hugging Face snapshot of the tokenizer)."""

    def __init__(self, file: str, context_length: int):
        from tokenizers import Tokenizer

        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise ValueError(f"context_length must be an int >= 2, got {context_length!r}")
        path = Path(file)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {str(file)!r}: no such tokenizer.json (or folder holding one)")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises its own exception types for a malformed file
            raise ValueError(f"tokenizer {str(path)!r} is not a Hugging Face tokenizer.json: {e}") from None
        self.context_length = context_length
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        padding = self._tok.padding
        if padding is not None:
            pad_id = padding["pad_id"]
        else:
            pad = _pad_token(path.parent)
            pad_id = self._tok.token_to_id(pad) if pad is not None else None
            if pad_id is None:
                raise ValueError(
                    f"tokenizer {str(path)!r} names no pad token (no padding section, no pad_token in "
                    "tokenizer_config.json or special_tokens_map.json beside it): the text tower needs it"
                )
        self.pad_id = int(pad_id)
        self._plain = Tokenizer.from_str(self._tok.to_str())  # for encode(): no padding, no truncation
        self._plain.no_padding()
        self._plain.no_truncation()
        self._tok.enable_truncation(max_length=context_length)
        self._tok.enable_padding(length=context_length, pad_id=self.pad_id, pad_token=self._tok.id_to_token(pad_id))

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without special tokens, padding or truncation."""
        return self._plain.encode(canonicalize(text), add_special_tokens=False).ids

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a string or a list of strings")
        rows = [enc.ids for enc in self._tok.encode_batch([canonicalize(t) for t in texts])]
        return torch.tensor(rows, dtype=torch.long).reshape(len(texts), self.context_length)
