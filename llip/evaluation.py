"""Zero-shot classification and image-text retrieval, for Llip and the pooled baselines alike.

Llip scores a pair by ``cos(z_ij, y_j)`` (the image embedding mixed by the text's query), computed block by
block with ``llip_kernels.llip_logits``; pooled kinds by ``cos(image_i, text_j)``. Images are encoded one batch
at a time and only per-batch scores ``[batch, M]`` plus running top-10 lists are held, so memory stays bounded
for thousands of images and captions.

The mixer temperature tau is a Llip hyper-parameter that can be chosen after training (the paper's evaluation
sweeps it over {1, 3, 5, 8, 10}): every function takes ``tau`` (None: the model's own), and the ``*_sweep`` variants
score each encoded image batch at several temperatures, so the image tower runs once per image.
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


def _scores_of_encoded(model, enc, q, y, backend, tau: float | None = None) -> torch.Tensor:
    """Cosine scores ``[b, M]`` (float32) of encoded images (``model.encode_image``'s output) against every text
    side ``(q, y)``. ``tau``: the Llip mixer temperature (None: the model's own); pooled kinds ignore it."""
    if model.kind == "llip":
        import llip_kernels

        k, v = enc
        dt = k.dtype
        tau = model.tau if tau is None else tau
        return llip_kernels.llip_logits(k, v.to(dt), q.to(dt), y.to(dt), model.w_out.to(dt), tau=tau, backend=backend)
    return F.normalize(enc.float(), dim=-1) @ F.normalize(y.float(), dim=-1).t()


def _scores(model, images: torch.Tensor, q, y, backend, tau: float | None = None) -> torch.Tensor:
    """Cosine scores ``[b, M]`` (float32) of a batch of images against every text side ``(q, y)``."""
    return _scores_of_encoded(model, model.encode_image(images.to(_device(model))), q, y, backend, tau)


def build_zero_shot_classifier(
    model,
    tokenizer: Callable,
    classnames: list[str],
    templates: list[str | Callable[[str], str]],
    batch_size: int = 256,
) -> ZeroShotClassifier:
    """Encode ``template(classname)`` for every class and template (templates are ``"a photo of a {}."``
    strings or callables) and average per class (docs/design.md section 1): Llip averages the queries Q and the
    normalised text embeddings y (then normalises); pooled kinds average the normalised embeddings.

    A few classes are encoded at a time (about ``batch_size`` texts), so memory holds ``[C, D]``, not the
    ``[C * T, D]`` of every prompt (80,000 prompts for ImageNet's 1000 classes and 80 templates)."""
    if not classnames or not templates:
        raise ValueError("need at least one class name and one template")
    T = len(templates)
    per_chunk = max(1, batch_size // T)  # classes per encoder call
    qs, ys = [], []
    with _eval_mode(model):
        for s in range(0, len(classnames), per_chunk):
            chunk = classnames[s : s + per_chunk]
            texts = [t(c) if callable(t) else t.format(c) for c in chunk for t in templates]  # class-major
            q, y = _encode_texts(model, tokenizer(texts), batch_size)
            C = len(chunk)
            ys.append(F.normalize(F.normalize(y.float(), dim=-1).view(C, T, -1).mean(1), dim=-1))  # [C, D]
            if q is not None:
                qs.append(q.float().view(C, T, *q.shape[1:]).mean(1))  # [C, H, d]
    return ZeroShotClassifier(y=torch.cat(ys), q=torch.cat(qs) if qs else None)


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
    tau: float | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (fractions in [0, 1]) of the argmax over classes of each image's score.

    ``images``: ``[N, 3, S, S]`` float tensor with ``labels: [N]`` int64, or an iterable of image batches (with
    ``labels`` for all of them in order) or of ``(images, labels)`` batches. Top-5 becomes top-C with C < 5
    classes. ``tau``: the Llip mixer temperature (None: the model's own).
    """
    return zero_shot_accuracy_sweep(model, classifier, images, [tau], labels, batch_size, backend)[tau]


def zero_shot_accuracy_sweep(
    model,
    classifier: ZeroShotClassifier,
    images: torch.Tensor | Iterable,
    taus: list[float | None],
    labels=None,
    batch_size: int = 256,
    backend: str | None = None,
) -> dict[float | None, dict[str, float]]:
    """:func:`zero_shot_accuracy` at each Llip mixer temperature of ``taus`` (None: the model's own), keyed by
    tau. Each image batch is encoded once and scored at every tau: the mixer is cheap, the image tower is not."""
    hits = {tau: [0, 0] for tau in taus}  # tau -> [top-1 hits, top-5 hits]
    n = 0
    dev = _device(model)
    top = min(5, classifier.num_classes)
    with _eval_mode(model):
        q = None if classifier.q is None else classifier.q.to(dev)
        y = classifier.y.to(dev)
        for batch, lab in _image_batches(images, labels, batch_size):
            if lab is None:
                raise ValueError("zero_shot_accuracy needs labels: pass labels=[N] or batches of (images, labels)")
            enc = model.encode_image(batch.to(dev))
            lab = torch.as_tensor(lab, device=dev).long()
            for tau in taus:
                best = _scores_of_encoded(model, enc, q, y, backend, tau).topk(top, dim=1).indices  # [b, top]
                hits[tau][0] += (best[:, 0] == lab).sum().item()
                hits[tau][1] += (best == lab[:, None]).any(dim=1).sum().item()
            n += lab.numel()
    if n == 0:
        raise ValueError("zero_shot_accuracy got no images")
    return {tau: {"top1": h1 / n, "top5": h5 / n} for tau, (h1, h5) in hits.items()}


def _merge_topk(vals: torch.Tensor, idx: torch.Tensor, new_vals: torch.Tensor, new_idx: torch.Tensor, k: int):
    """Keep the ``k`` best of two candidate lists per row (``[R, *]`` values with their column ids)."""
    v = torch.cat([vals, new_vals], dim=1)
    i = torch.cat([idx, new_idx], dim=1)
    best = v.topk(min(k, v.shape[1]), dim=1)
    return best.values, i.gather(1, best.indices)


class _RecallCounter:
    """Running recall at 1, 5 and 10 both ways over image batches scored against all ``M`` captions."""

    def __init__(self, caption_to_image: torch.Tensor):
        M = caption_to_image.shape[0]
        self.caption_to_image = caption_to_image  # [M] int64, on the CPU
        self.i2t_hits = {k: 0 for k in RECALL_AT}
        self.t2i_vals = torch.full((M, 0), float("-inf"))  # running top-10 image scores per caption
        self.t2i_idx = torch.zeros((M, 0), dtype=torch.long)  # ... and the images they belong to

    def add(self, scores: torch.Tensor, first: int) -> None:
        """``scores [b, M]``: images ``first .. first + b - 1`` against every caption."""
        b, M = scores.shape
        kmax = max(RECALL_AT)
        # image -> text: rank of the best-ranked own caption
        top = scores.topk(min(kmax, M), dim=1).indices  # [b, <=10]
        own = self.caption_to_image[top] == torch.arange(first, first + b)[:, None]  # [b, <=10]
        for k in RECALL_AT:
            self.i2t_hits[k] += own[:, :k].any(dim=1).sum().item()
        # text -> image: running top-10 images per caption
        new_idx = torch.arange(first, first + b).expand(M, b)
        self.t2i_vals, self.t2i_idx = _merge_topk(self.t2i_vals, self.t2i_idx, scores.t(), new_idx, kmax)

    def result(self, n_images: int) -> dict[str, float]:
        M = self.caption_to_image.shape[0]
        hits_t2i = self.t2i_idx == self.caption_to_image[:, None]  # [M, <=10]
        out = {f"image_to_text_R@{k}": self.i2t_hits[k] / max(n_images, 1) for k in RECALL_AT}
        out.update(
            {f"text_to_image_R@{k}": hits_t2i[:, :k].any(dim=1).float().mean().item() if M else 0.0 for k in RECALL_AT}
        )
        return out


def retrieval_metrics(
    model,
    images: torch.Tensor,
    tokens: torch.Tensor,
    caption_to_image: torch.Tensor,
    batch_size: int = 256,
    backend: str | None = None,
    tau: float | None = None,
) -> dict[str, float]:
    """Image->text and text->image recall at 1, 5 and 10 (fractions in [0, 1]), COCO/Flickr protocol.

    ``images: [N, 3, S, S]``, ``tokens: [M, L]``, ``caption_to_image: [M]`` int64 (the image each caption
    describes). Image->text: an image scores a hit at k when any of its captions is among its k best captions.
    Text->image: a caption scores a hit when its image is among its k best images. Ties are broken by topk.
    ``tau``: the Llip mixer temperature (None: the model's own).
    """
    return retrieval_metrics_sweep(model, images, tokens, caption_to_image, [tau], batch_size, backend)[tau]


def retrieval_metrics_sweep(
    model,
    images: torch.Tensor,
    tokens: torch.Tensor,
    caption_to_image: torch.Tensor,
    taus: list[float | None],
    batch_size: int = 256,
    backend: str | None = None,
) -> dict[float | None, dict[str, float]]:
    """:func:`retrieval_metrics` at each Llip mixer temperature of ``taus`` (None: the model's own), keyed by tau;
    each image batch is encoded once."""
    N, M = images.shape[0], tokens.shape[0]
    caption_to_image = torch.as_tensor(caption_to_image).long().cpu()
    if caption_to_image.shape != (M,):
        raise ValueError(f"caption_to_image must have shape [M] = [{M}], got {list(caption_to_image.shape)}")
    if M and (caption_to_image.min() < 0 or caption_to_image.max() >= N):
        raise ValueError(f"caption_to_image values must index the {N} images")
    counters = {tau: _RecallCounter(caption_to_image) for tau in taus}
    with _eval_mode(model):
        q, y = _encode_texts(model, tokens, batch_size)
        for s in range(0, N, batch_size):
            enc = model.encode_image(images[s : s + batch_size].to(_device(model)))
            for tau, counter in counters.items():
                counter.add(_scores_of_encoded(model, enc, q, y, backend, tau).cpu(), s)  # [b, M]
    return {tau: counter.result(N) for tau, counter in counters.items()}


def score_matrix(
    model,
    images: torch.Tensor,
    tokens: torch.Tensor,
    batch_size: int = 256,
    backend: str | None = None,
    tau: float | None = None,
) -> torch.Tensor:
    """Every image against every caption: cosine scores ``[N, M]`` (float32, on the CPU) of ``images [N, 3, S, S]``
    and ``tokens [M, L]``; for probes small enough to hold the whole matrix (a few thousand of each)."""
    rows = []
    with _eval_mode(model):
        q, y = _encode_texts(model, tokens, batch_size)
        for s in range(0, images.shape[0], batch_size):
            rows.append(_scores(model, images[s : s + batch_size], q, y, backend, tau).cpu())
    return torch.cat(rows)
