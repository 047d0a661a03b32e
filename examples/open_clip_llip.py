"""Add Llip to an open_clip model and train it for a few steps on llip's built-in scenes (no download).

    pip install open_clip_torch        # and llip
    python examples/open_clip_llip.py --steps 50

The open_clip model is a small ViT CLIP built from its config classes. Three lines make it a Llip model:
``MixtureTokens`` rides K learned tokens along the ViT's patch tokens, ``LlipHead`` projects their outputs and the
text feature into the Llip loss inputs, and ``LlipSigmoidLoss`` scores every image against every caption with
the fused kernels. Everything else (the towers, open_clip's tokenizer, the optimizer) is the open_clip user's own.
"""

from __future__ import annotations

import argparse

import torch

import llip
import llip_kernels.nn
from llip.data import builtin


def build(args):
    """``(open_clip model, MixtureTokens, LlipHead)``: a tiny open_clip ViT CLIP with Llip added."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    width, embed_dim = 64, 64
    vision = CLIPVisionCfg(layers=2, width=width, head_width=32, patch_size=4, image_size=args.image_size)
    text = CLIPTextCfg(context_length=args.context_length, vocab_size=49408, width=width, heads=2, layers=2)
    model = CLIP(embed_dim, vision, text, init_logit_bias=-10.0)  # a logit bias: the sigmoid loss learns one
    mixture = llip.MixtureTokens(args.tokens, width).attach(model.visual.transformer)
    head = llip.LlipHead(vision_width=width, text_width=embed_dim, embed_dim=embed_dim, num_tokens=args.tokens,
                         num_heads=args.heads, tau=args.tau)  # fmt: skip
    return model, mixture, head


def batches(args):
    """Built-in scenes ``(images [B, 3, S, S], captions)``, one random caption per scene, in a seeded order."""
    transform = llip.image_transform(args.image_size, train=True)
    order = torch.randperm(100_000, generator=torch.Generator().manual_seed(args.seed))
    for step in range(args.steps):
        ids = order[step * args.batch_size : (step + 1) * args.batch_size].tolist()
        scenes = [builtin.make_scene("train", n) for n in ids]
        images = torch.stack([transform(builtin.render(s, args.image_size)) for s in scenes])
        captions = [s.captions[builtin.caption_choice(args.seed, 0, n, len(s.captions))] for n, s in zip(ids, scenes)]
        yield images, captions


def main(argv: list[str] | None = None) -> list[float]:
    """Train; print and return the loss of every step."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tokens", type=int, default=8, help="K mixture tokens")
    p.add_argument("--heads", type=int, default=4, help="H mixer heads")
    p.add_argument("--tau", type=float, default=5.0, help="the mixer temperature")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--context-length", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from open_clip import tokenize

    torch.manual_seed(args.seed)
    model, mixture, head = build(args)
    loss_fn = llip_kernels.nn.LlipSigmoidLoss(head.tau)
    params = [*model.parameters(), *mixture.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.1)
    losses = []
    for step, (images, captions) in enumerate(batches(args)):
        model.encode_image(images)  # the pooled output is not used: Llip scores with the mixture tokens
        text = model.encode_text(tokenize(captions, context_length=args.context_length))  # [B, D]
        out = head(mixture.pop(), text_features=text, text_embedding=text)
        loss = loss_fn(**out, logit_scale=model.logit_scale.exp(), logit_bias=model.logit_bias)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        print(f"step {step + 1:4d}  loss {loss.item():.4f}")
    return losses


if __name__ == "__main__":
    main()
