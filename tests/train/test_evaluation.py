"""Zero-shot classification and retrieval: constructed cases with known answers (stub encoders), and the real
tiny models against a direct all-pairs computation (with batch sizes that split the data into uneven blocks)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llip
import llip_kernels
from llip.evaluation import build_zero_shot_classifier, retrieval_metrics, zero_shot_accuracy


class StubLlip(nn.Module):
    """A Llip-shaped model with hand-made encoders. D = 7 (classes 0..5, dim 6 for noise), H = 1, K = 2.

    An "image" is a row ``(c, distractor)``: token 0 has key and value e_c, token 1 key e_distractor and value
    0.8 e_distractor + 0.6 e_6. A "text" is a row ``(c, template)``: query 10 e_c (+ 2 e_6 for template 1) and
    y = (1 + 2 * template) e_c. The class's query selects its own token, so cos(z, y_c) ~ 1 for the image's class
    and ~ 0.8 for its distractor."""

    kind = "llip"

    def __init__(self):
        super().__init__()
        self.w_out = nn.Parameter(torch.eye(7))
        self.tau = 1.0

    def encode_image(self, images):
        e = torch.eye(7)
        c, dis = images[:, 0], images[:, 1]
        k = torch.stack([e[c], e[dis]], 1)  # [B, K=2, 7]
        v = torch.stack([e[c], 0.8 * e[dis] + 0.6 * e[6]], 1)
        return k[:, None], v[:, None]  # [B, H=1, K, d=7]

    def encode_text(self, tokens):
        e = torch.eye(7)
        c, tmpl = tokens[:, 0], tokens[:, 1].float()[:, None]
        q = 10 * e[c] + 2 * tmpl * e[6]
        return q[:, None], (1 + 2 * tmpl) * e[c]


def stub_tokenizer(texts):
    """``"<template id>:<class id>"`` -> ``[[class, template]]``."""
    return torch.tensor([[int(t.split(":")[1]), int(t.split(":")[0])] for t in texts])


def test_zero_shot_constructed_case():
    model = StubLlip()
    classes = [str(c) for c in range(6)]
    clf = build_zero_shot_classifier(model, stub_tokenizer, classes, ["0:{}", lambda c: f"1:{c}"], batch_size=5)
    # Q averaged over templates: 10 e_c + e_6; y: normalised mean of normalised y's = e_c
    torch.testing.assert_close(clf.q[:, 0], 10 * torch.eye(7)[:6] + torch.eye(7)[6])
    torch.testing.assert_close(clf.y, torch.eye(7)[:6])
    images = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 4], [2, 0]])
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0])  # the last label is the image's distractor: second best
    acc = zero_shot_accuracy(model, clf, images, labels, batch_size=3)
    assert acc == {"top1": 6 / 7, "top5": 1.0}
    # the same through an iterable of (images, labels) batches and of bare image batches
    assert zero_shot_accuracy(model, clf, [(images[:4], labels[:4]), (images[4:], labels[4:])]) == acc
    assert zero_shot_accuracy(model, clf, [images[:2], images[2:]], labels) == acc


class StubPooled(nn.Module):
    """A pooled model whose "images" and "texts" are their embeddings already."""

    kind = "siglip"

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def encode_image(self, images):
        return images

    def encode_text(self, tokens):
        return tokens


def test_retrieval_hand_computed():
    # Scores S[image, caption] (4 images, 6 captions; captions 0,1 -> image 0, 2,3 -> 1, 4 -> 2, 5 -> 3).
    S = torch.tensor(
        [
            [0.9, 0.1, 0.8, 0.0, 0.2, 0.3],  # own caption 0 ranks 1st
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # own captions 3, 2 rank 3rd, 4th
            [0.7, 0.6, 0.5, 0.35, 0.3, 0.2],  # own caption 4 ranks 5th
            [0.0, 0.05, 0.1, 0.2, 0.25, 0.9],
        ]
    )  # own caption 5 ranks 1st
    caption_to_image = torch.tensor([0, 0, 1, 1, 2, 3])
    # Images are orthonormal; caption j = [S[:, j] / 2, pad] with pad giving every caption norm 1: cos = S / 2.
    images = torch.eye(5)[:4]
    pad = (1 - (S**2).sum(0) / 4).sqrt()[None]
    captions = torch.cat([S / 2, pad]).t()  # [6, 5]
    got = retrieval_metrics(StubPooled(), images, captions, caption_to_image, batch_size=3)
    # text -> image ranks of the right image: c0 1st, c1 3rd (0.6, 0.2 above 0.1), c2 3rd, c3 1st, c4 2nd, c5 1st
    assert got == pytest.approx(
        {
            "image_to_text_R@1": 2 / 4,
            "image_to_text_R@5": 1.0,
            "image_to_text_R@10": 1.0,
            "text_to_image_R@1": 3 / 6,
            "text_to_image_R@5": 1.0,
            "text_to_image_R@10": 1.0,
        }
    )


def full_matrix_recalls(scores, caption_to_image):
    """Recall@k from the whole score matrix by counting strictly better items (no ties in random data)."""
    N, M = scores.shape
    own = caption_to_image[None, :] == torch.arange(N)[:, None]  # [N, M]
    pos_t2i = scores[caption_to_image, torch.arange(M)]  # [M]
    rank_t2i = (scores > pos_t2i[None]).sum(0)  # [M], 0 = best
    best_own = scores.masked_fill(~own, float("-inf")).max(1).values  # [N]
    rank_i2t = (scores > best_own[:, None]).sum(1)
    out = {f"image_to_text_R@{k}": (rank_i2t < k).float().mean().item() for k in (1, 5, 10)}
    out.update({f"text_to_image_R@{k}": (rank_t2i < k).float().mean().item() for k in (1, 5, 10)})
    return out


@pytest.mark.parametrize("name", ["llip-tiny", "clip-tiny"])
def test_real_model_retrieval_and_zero_shot(name):
    torch.manual_seed(0)
    model = llip.create_model(name, K=4, vision_layers=1, text_layers=1)
    tok = llip.get_tokenizer(model.context_length)
    N, M = 23, 37
    images = torch.randn(N, 3, model.image_size, model.image_size)
    caption_to_image = torch.cat([torch.arange(N), torch.randint(0, N, (M - N,))])
    tokens = tok([f"caption {j} of a shape number {j * 7 % 11}" for j in range(M)])
    model.train()
    got = retrieval_metrics(model, images, tokens, caption_to_image, batch_size=8)
    assert model.training  # evaluation restores the mode
    with torch.no_grad():
        model.eval()
        if model.kind == "llip":
            k, v = model.encode_image(images)
            q, y = model.encode_text(tokens)
            scores = llip_kernels.llip_logits(k, v, q, y, model.w_out, tau=model.tau, backend="reference")
        else:
            img, txt = model.encode_image(images), model.encode_text(tokens)
            scores = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    assert got == pytest.approx(full_matrix_recalls(scores, caption_to_image), abs=1e-6)

    # zero-shot: the classifier averages per-template encodings; accuracy = argmax of the all-pairs scores
    classes, templates = ["circle", "square", "triangle"], ["a photo of a {}.", "a drawing of a {}"]
    clf = build_zero_shot_classifier(model, tok, classes, templates, batch_size=4)
    with torch.no_grad():
        per_template = [model.encode_text(tok([t.format(c) for c in classes])) for t in templates]
        if model.kind == "llip":
            q_c = torch.stack([p[0] for p in per_template]).mean(0)
            y_c = F.normalize(torch.stack([F.normalize(p[1], dim=-1) for p in per_template]).mean(0), dim=-1)
            torch.testing.assert_close(clf.q, q_c)
            scores = llip_kernels.llip_logits(k, v, q_c, y_c, model.w_out, tau=model.tau, backend="reference")
        else:
            y_c = F.normalize(torch.stack([F.normalize(p, dim=-1) for p in per_template]).mean(0), dim=-1)
            scores = F.normalize(model.encode_image(images), dim=-1) @ y_c.t()
    torch.testing.assert_close(clf.y, y_c)
    labels = torch.randint(0, 3, (N,))
    acc = zero_shot_accuracy(model, clf, images, labels, batch_size=6)
    assert acc["top1"] == pytest.approx((scores.argmax(1) == labels).float().mean().item())
    assert acc["top5"] == 1.0  # 3 classes: top-5 is top-3


def test_bad_arguments():
    model = StubPooled()
    with pytest.raises(ValueError, match="caption_to_image"):
        retrieval_metrics(model, torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="index the 3 images"):
        retrieval_metrics(model, torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels"):
        zero_shot_accuracy(model, llip.evaluation.ZeroShotClassifier(y=torch.eye(3)), torch.eye(3))
    with pytest.raises(ValueError, match="at least one"):
        build_zero_shot_classifier(model, stub_tokenizer, [], ["{}"])
