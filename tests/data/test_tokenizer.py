"""The CLIP BPE tokenizer: ids checked by hand against CLIP's vocabulary, padding, truncation, clean-up.

The expected ids below were read off the vocabulary (line order of CLIP's merges file) and agree with the
examples of the OpenAI CLIP README ("a diagram", "a dog", "a cat").
"""

import gzip

import pytest
import torch

import llip
from llip.tokenizer import EOT_ID, NUM_MERGES, SOT_ID, _byte_chars, clean, find_vocab_file


@pytest.fixture(scope="module")
def tok():
    return llip.get_tokenizer()


@pytest.mark.parametrize(
    "text, ids",
    [
        ("a photo of a cat", [320, 1125, 539, 320, 2368]),  # a</w> photo</w> of</w> a</w> cat</w>
        ("a diagram", [320, 22697]),
        ("a dog", [320, 1929]),
        ("hello world", [3306, 1002]),
        ("  A Photo   OF a CAT ", [320, 1125, 539, 320, 2368]),  # lower-cased, whitespace collapsed
        ("cat!!", [2368, 748]),  # punctuation runs are their own word: !!</w>
        ("it's", [585, 568]),  # it</w> 's</w>
        ("2024", [273, 271, 273, 275]),  # digits one by one
        ("salt &amp; pepper", [6611, 261, 8253]),  # HTML entities unescaped: salt</w> &</w> pepper</w>
        ("", []),
    ],
)
def test_hand_checked_ids(tok, text, ids):
    row = tok(text)
    assert row.shape == (1, 77) and row.dtype == torch.int64
    expected = [SOT_ID, *ids, EOT_ID]
    assert row[0, : len(expected)].tolist() == expected
    assert (row[0, len(expected) :] == 0).all()


def test_byte_tokens_follow_clip_order(tok):
    # bytes "!".."~" come first (id = byte - 33), then the same 256 characters with "</w>" (id + 256):
    # "a" is byte 97 -> 64, "a</w>" -> 320, "&</w>" -> 5 + 256 = 261.
    assert [tok._id_to_token[i] for i in (0, 64, 256, 261, 320, SOT_ID, EOT_ID)] == [
        "!",
        "a",
        "!</w>",
        "&</w>",
        "a</w>",
        "<start_of_text>",
        "<end_of_text>",
    ]


def test_batch_context_length_and_truncation():
    tok = llip.get_tokenizer(context_length=6)
    out = tok(["a photo of a cat", "a photo of a very very large cat on a mat", "dog"])
    assert out.shape == (3, 6)
    assert out[0].tolist() == [SOT_ID, 320, 1125, 539, 320, 2368][:5] + [EOT_ID]  # cut, end token kept last
    assert out[1, 0] == SOT_ID and out[1, -1] == EOT_ID
    assert out[2].tolist() == [SOT_ID, 1929, EOT_ID, 0, 0, 0]
    assert (out.argmax(dim=1) == torch.tensor([5, 5, 2])).all()  # the text tower pools at the end token


def test_decode_round_trip(tok):
    for text in ("a photo of a cat", "naïve café 日本", "x+y = 2"):
        assert tok.decode(tok(text)[0]).replace(" ", "") == clean(text).replace(" ", "")


def test_bad_arguments():
    with pytest.raises(ValueError, match="context_length"):
        llip.get_tokenizer(context_length=1)
    with pytest.raises(TypeError, match="string"):
        llip.get_tokenizer()([1, 2])


def _naive_bpe_ids(word: str, ranks: dict, index: dict) -> list[int]:
    """The textbook BPE of CLIP: repeatedly merge the adjacent pair with the lowest merge rank."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        rank, i = min((ranks.get((parts[i], parts[i + 1]), float("inf")), i) for i in range(len(parts) - 1))
        if rank == float("inf"):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return [index[p] for p in parts]


def test_matches_naive_bpe_on_vocabulary_words(tok):
    """The `tokenizers` BPE model against a plain-Python BPE, on words sampled from the merges file (ASCII letter
    words, so the word split is unambiguous)."""
    with gzip.open(find_vocab_file(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : 1 + NUM_MERGES]
    merges = [tuple(line.split()) for line in lines]
    ranks = {m: r for r, m in enumerate(merges)}
    alphabet = list(_byte_chars().values())
    index = {t: i for i, t in enumerate(alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges])}
    words = ["".join(m).replace("</w>", "") for m in merges[::97]]
    words = [w for w in words if w.isascii() and w.isalpha()][:300]
    words += ["supercalifragilisticexpialidocious", "tokenization", "unbelievably", "zzzzzzzz"]
    for w in words:
        assert tok.encode(w) == _naive_bpe_ids(w.lower(), ranks, index), w
