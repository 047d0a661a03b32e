"""Zero-shot classification and image-text retrieval, for Llip and the pooled baselines alike.

Llip scores a pair by ``cos(z_ij, y_j)`` (the image embedding mixed by the text's query), computed block by
block with ``llip_kernels.llip_logits``; pooled kinds by ``cos(image_i, text_j)``. Images are encoded one batch
at a time and only per-batch scores ``[batch, M]`` plus running top-10 lists are held, so memory stays bounded
for thousands of images and captions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

RECALL_AT = (1, 5, 10)


@dataclass
class ZeroShotClassifier:
    """Per-class text side. Llip: ``q: [C, H, d]`` (mean query over templates) and ``y: [C, D]`` (normalised
    mean of the normalised text embeddings); pooled kinds: ``y`` only and ``q`` None."""

    y: torch.Tensor
    q: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return self.y.shape[0]


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _encode_texts(model, tokens: torch.Tensor, batch_size: int):
    """``(q [M, H, d] or None, y [M, D])`` for every row of ``tokens``, encoded ``batch_size`` rows at a time."""
    qs, ys = [], []
    dev = _device(model)
    for s in range(0, tokens.shape[0], batch_size):
        enc = model.encode_text(tokens[s : s + batch_size].to(dev))
        q, y = enc if model.kind == "llip" else (None, enc)
        ys.append(y)
        if q is not None:
            qs.append(q)
    return (torch.cat(qs) if qs else None), torch.cat(ys)


def _scores(model, images: torch.Tensor, q, y, backend) -> torch.Tensor:
    """Cosine scores ``[b, M]`` (float32) of a batch of images against every text side ``(q, y)``."""
    enc = model.encode_image(images.to(_device(model)))
    if model.kind == "llip":
        import llip_kernels

        k, v = enc
        dt = k.dtype
        return llip_kernels.llip_logits(
            k, v.to(dt), q.to(dt), y.to(dt), model.w_out.to(dt), tau=model.tau, backend=backend
        )
    return F.normalize(enc.float(), dim=-1) @ F.normalize(y.float(), dim=-1).t()


def build_zero_shot_classifier(
    model,
    tokenizer: Callable,
    classnames: list[str],
    templates: list[str | Callable[[str], str]],
    batch_size: int = 256,
) -> ZeroShotClassifier:
    """Encode ``template(classname)`` for every class and template (templates are ``"a photo of a {}."``
    strings or callables) and average per class (docs/design.md section 1): Llip averages the queries Q and the
    normalised text embeddings y (then normalises); pooled kinds average the normalised embeddings."""
    if not classnames or not templates:
        raise ValueError("need at least one class name and one template")
    texts = [t(c) if callable(t) else t.format(c) for c in classnames for t in templates]  # class-major
    with _eval_mode(model):
        q, y = _encode_texts(model, tokenizer(texts), batch_size)
    C, T = len(classnames), len(templates)
    y = F.normalize(F.normalize(y.float(), dim=-1).view(C, T, -1).mean(1), dim=-1)  # [C, D]
    if q is not None:
        q = q.float().view(C, T, *q.shape[1:]).mean(1)  # [C, H, d]
    return ZeroShotClassifier(y=y, q=q)


def _image_batches(images, labels, batch_size: int):
    """Yield ``(images [b, 3, S, S], labels [b] or None)`` from a tensor or an iterable of batches (tensors or
    ``(images, labels)`` pairs); ``labels`` given with an iterable are consumed in order."""
    if isinstance(images, torch.Tensor):
        for s in range(0, images.shape[0], batch_size):
            yield images[s : s + batch_size], None if labels is None else labels[s : s + batch_size]
        return
    offset = 0
    for batch in images:
        if isinstance(batch, (tuple, list)):
            batch, lab = batch[0], batch[1]
        else:
            lab = None if labels is None else labels[offset : offset + batch.shape[0]]
        offset += batch.shape[0]
        yield batch, lab


def zero_shot_accuracy(
    model,
    classifier: ZeroShotClassifier,
    images: torch.Tensor | Iterable,
    labels=None,
    batch_size: int = 256,
    backend: str | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (fractions in [0, 1]) of the argmax over classes of each image's score.

    ``images``: ``[N, 3, S, S]`` float tensor with ``labels: [N]`` int64, or an iterable of image batches (with
    ``labels`` for all of them in order) or of ``(images, labels)`` batches. Top-5 becomes top-C with C < 5
    classes.
    """
    correct1 = correct5 = n = 0
    dev = _device(model)
    top = min(5, classifier.num_classes)
    with _eval_mode(model):
        q = None if classifier.q is None else classifier.q.to(dev)
        y = classifier.y.to(dev)
        for batch, lab in _image_batches(images, labels, batch_size):
            if lab is None:
                raise ValueError("zero_shot_accuracy needs labels: pass labels=[N] or batches of (images, labels)")
            scores = _scores(model, batch, q, y, backend)  # [b, C]
            lab = torch.as_tensor(lab, device=scores.device).long()
            best = scores.topk(top, dim=1).indices  # [b, top]
            correct1 += (best[:, 0] == lab).sum().item()
            correct5 += (best == lab[:, None]).any(dim=1).sum().item()
            n += lab.numel()
    if n == 0:
        raise ValueError("zero_shot_accuracy got no images")
    return {"top1": correct1 / n, "top5": correct5 / n}


def _merge_topk(vals: torch.Tensor, idx: torch.Tensor, new_vals: torch.Tensor, new_idx: torch.Tensor, k: int):
    """Keep the ``k`` best of two candidate lists per row (``[R, *]`` values with their column ids)."""
    v = torch.cat([vals, new_vals], dim=1)
    i = torch.cat([idx, new_idx], dim=1)
    best = v.topk(min(k, v.shape[1]), dim=1)
    return best.values, i.gather(1, best.indices)


def retrieval_metrics(
    model,
    images: torch.Tensor,
    tokens: torch.Tensor,
    caption_to_image: torch.Tensor,
    batch_size: int = 256,
    backend: str | None = None,
) -> dict[str, float]:
    """Image->text and text->image recall at 1, 5 and 10 (fractions in [0, 1]), COCO/Flickr protocol.

    ``images: [N, 3, S, S]``, ``tokens: [M, L]``, ``caption_to_image: [M]`` int64 (the image each caption
    describes). Image->text: an image scores a hit at k when any of its captions is among its k best captions.
    Text->image: a caption scores a hit when its image is among its k best images. Ties are broken by topk.
    """
    N, M = images.shape[0], tokens.shape[0]
    caption_to_image = torch.as_tensor(caption_to_image).long().cpu()
    if caption_to_image.shape != (M,):
        raise ValueError(f"caption_to_image must have shape [M] = [{M}], got {list(caption_to_image.shape)}")
    if M and (caption_to_image.min() < 0 or caption_to_image.max() >= N):
        raise ValueError(f"caption_to_image values must index the {N} images")
    kmax = max(RECALL_AT)
    i2t_hits = {k: 0 for k in RECALL_AT}
    t2i_vals = torch.full((M, 0), float("-inf"))
    t2i_idx = torch.zeros((M, 0), dtype=torch.long)
    with _eval_mode(model):
        q, y = _encode_texts(model, tokens, batch_size)
        for s in range(0, N, batch_size):
            scores = _scores(model, images[s : s + batch_size], q, y, backend).cpu()  # [b, M]
            b = scores.shape[0]
            # image -> text: rank of the best-ranked own caption
            top = scores.topk(min(kmax, M), dim=1).indices  # [b, <=10]
            own = caption_to_image[top] == torch.arange(s, s + b)[:, None]  # [b, <=10]
            for k in RECALL_AT:
                i2t_hits[k] += own[:, :k].any(dim=1).sum().item()
            # text -> image: running top-10 images per caption
            new_idx = torch.arange(s, s + b).expand(M, b)
            t2i_vals, t2i_idx = _merge_topk(t2i_vals, t2i_idx, scores.t(), new_idx, kmax)
    hits_t2i = t2i_idx == caption_to_image[:, None]  # [M, <=10]
    out = {f"image_to_text_R@{k}": i2t_hits[k] / max(N, 1) for k in RECALL_AT}
    out.update(
        {f"text_to_image_R@{k}": hits_t2i[:, :k].any(dim=1).float().mean().item() if M else 0.0 for k in RECALL_AT}
    )
    return out
