"""The llip model package: configs, parameter counts, output shapes, the loss against a hand-written Llip, bad inputs.

Tiny models on CPU (fast); the paper-size configs are built on the meta device (no memory, no time).
"""

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import llip
from llip.configs import ModelConfig
from llip_kernels.testing import check_rule, check_same_result

KINDS = ("llip", "siglip", "clip", "register", "avg")
TINY = {kind: f"{kind}-tiny" for kind in KINDS}
# One model per row of docs/design.md section 2 (with its K), plus the CPU sizes.
PAPER = ("llip-vit-b32-k64", "llip-vit-b16-k32", "llip-vit-l14-k64", "llip-vit-h14-k64", "llip-vit-g14-k64")


def make_batch(model, B=5, seed=0):
    """Random images and tokens shaped like real ones: start token, a few words, end token (the largest id)."""
    g = torch.Generator().manual_seed(seed)
    S, L = model.image_size, model.context_length
    images = torch.randn(B, 3, S, S, generator=g)
    tokens = torch.zeros(B, L, dtype=torch.long)
    for i in range(B):
        n = 2 + i % (L - 2)  # different EOT positions, including the last slot for the longest rows
        tokens[i, 0] = 49406
        tokens[i, 1 : n - 1] = torch.randint(1, 49000, (n - 2,), generator=g)
        tokens[i, n - 1] = 49407
    return images, tokens


# ------------------------------------------------------------------------------------------------------ configs
def test_registry_has_every_paper_row_and_every_kind():
    names = llip.list_models()
    for name in (
        *PAPER,
        *TINY.values(),
        "llip-small",
        "siglip-vit-b16",
        "clip-vit-b16",
        "register-vit-b16-k32",
        "avg-vit-b16-k32",
    ):
        assert name in names
    rows = {n: llip.get_config(n) for n in PAPER}
    # (K, H, D, tau, qkv_norm, text width, text layers) of docs/design.md section 2
    assert [(c.K, c.H, c.D, c.tau, c.qkv_norm, c.text_width, c.text_layers) for c in rows.values()] == [
        (64, 8, 512, 5.0, False, 512, 12),
        (32, 8, 512, 5.0, False, 512, 12),
        (64, 8, 768, 1.0, False, 768, 12),
        (64, 8, 1024, 5.0, True, 1024, 24),
        (64, 8, 1280, 5.0, True, 1280, 32),
    ]
    assert llip.get_config("llip-vit-g14-k64").mlp_width == 8192
    assert llip.get_config("clip-vit-b16").loss == "softmax"
    assert llip.get_config("siglip-vit-b16").loss == "sigmoid" and llip.get_config("siglip-vit-b16").K == 1


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'llip-nope'.*llip-tiny"):
        llip.create_model("llip-nope")


def test_bad_overrides_raise():
    with pytest.raises(ValueError, match="unknown config field.*'heads'.*valid overrides"):
        llip.create_model("llip-tiny", heads=4)
    with pytest.raises(ValueError, match="multiple of H"):
        llip.create_model("llip-tiny", H=3)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        llip.create_model("llip-tiny", patch_size=5)
    with pytest.raises(ValueError, match="tau"):
        llip.create_model("llip-tiny", tau=0.0)


def test_overrides_reach_the_model_and_config_serialises():
    m = llip.create_model(
        "llip-tiny",
        K=5,
        H=2,
        D=48,
        tau=3.0,
        qkv_norm=True,
        image_size=24,
        patch_size=6,
        vision_width=64,
        vision_layers=1,
        text_width=64,
        text_layers=1,
        context_length=16,
    )
    assert isinstance(m.config, ModelConfig) and m.config.name == "llip-tiny"
    assert (m.image_size, m.context_length, m.kind) == (24, 16, "llip")
    assert m.visual.positional_embedding.shape == (5 + 4 * 4, 64)  # K + grid^2 rows
    assert m.k_proj.shape == (5, 64, 48) and isinstance(m.k_norm, torch.nn.LayerNorm)
    out = m(*make_batch(m, B=3))
    assert out["k"].shape == (3, 2, 5, 24) and out["q"].shape == (3, 2, 24)
    assert m.tau == 3.0 and "tau" not in out
    assert json.loads(json.dumps(dataclasses.asdict(m.config)))["K"] == 5


# --------------------------------------------------------------------------------------------- parameter counts
def block_params(width, mlp):
    """Two LayerNorms, fused qkv projection, output projection, two MLP layers (all with biases)."""
    norms, qkv, out = 4 * width, 3 * width * width + 3 * width, width * width + width
    return norms + qkv + out + (width * mlp + mlp) + (mlp * width + width)


def expected_params(c: ModelConfig) -> int:
    """Count of every parameter, from the config's dimensions alone."""
    W, Wt, D, K, g = c.vision_width, c.text_width, c.D, c.K, c.image_size // c.patch_size
    mlp = int(W * c.mlp_ratio)
    big_vision = c.towers == "big_vision"  # conv bias, no ln_pre, siglip: attention pool instead of a class token
    pool = big_vision and c.kind == "siglip"
    tokens = 0 if pool else K
    vision = (
        3 * c.patch_size**2 * W
        + (W if big_vision else 0)
        + tokens * W
        + (tokens + g * g) * W
        + (0 if big_vision else 2 * W)
        + c.vision_layers * block_params(W, mlp)
        + 2 * W
    )
    if pool:  # latent, q, kv, proj, LayerNorm, MLP
        vision += W + (W * W + W) + (2 * W * W + 2 * W) + (W * W + W) + 2 * W + (W * mlp + mlp) + (mlp * W + W)
    text_mlp = int(Wt * c.mlp_ratio) if big_vision else 4 * Wt
    text = c.vocab_size * Wt + c.context_length * Wt + c.text_layers * block_params(Wt, text_mlp) + 2 * Wt
    if c.kind == "llip":
        heads = 2 * K * W * D + Wt * D + D * D + Wt * D + (6 * D if c.qkv_norm else 0)
    elif c.kind == "avg":
        heads = K * W * D + Wt * D  # one image projection per token
    else:
        heads = (0 if big_vision else W * D) + Wt * D
    heads += D if big_vision else 0  # the text projection's bias
    scalars = 2 if c.loss == "sigmoid" else 1
    return vision + text + heads + scalars


@pytest.mark.parametrize("name", llip.list_models())
def test_parameter_count_matches_dimensions(name):
    device = "cpu" if "tiny" in name or "small" in name else "meta"  # meta: no memory for the 2.8B G/14
    m = llip.create_model(name, device=device)
    assert sum(p.numel() for p in m.parameters()) == expected_params(m.config)


# Published sizes of the CLIP towers (OpenCLIP's model table, millions, image tower incl. its projection).
PUBLISHED = {
    "b32": (87.85, 63.43),
    "b16": (86.19, 63.43),
    "l14": (303.97, 123.65),
    "h14": (632.08, 354.03),
    "g14": (1844.91, 694.66),
}


@pytest.mark.parametrize("size", PUBLISHED)
def test_clip_towers_match_published_sizes(size):
    m = llip.create_model(f"clip-vit-{size}", device="meta")
    image = sum(p.numel() for p in m.visual.parameters()) + m.image_projection.numel()
    text = sum(p.numel() for p in m.text.parameters()) + m.text_projection.numel()
    assert (round(image / 1e6, 2), round(text / 1e6, 2)) == PUBLISHED[size]


# ------------------------------------------------------------------------------------------ outputs and training
@pytest.mark.parametrize("kind", KINDS)
def test_tiny_forward_backward_shapes(kind):
    torch.manual_seed(0)
    m = llip.create_model(TINY[kind])
    c = m.config
    B = 6
    out = m(*make_batch(m, B))
    assert out["logit_scale"].shape == () and out["logit_bias"].shape == ()
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert out["logit_bias"].item() == (-10.0 if kind != "clip" else 0.0)
    if kind == "llip":
        d = c.D // c.H
        shapes = {"k": (B, c.H, c.K, d), "v": (B, c.H, c.K, d), "q": (B, c.H, d), "y": (B, c.D), "w_out": (c.D, c.D)}
        assert m.tau == c.tau and isinstance(m.tau, float) and "tau" not in out
    else:
        shapes = {"image": (B, c.D), "text": (B, c.D)}
    for key, shape in shapes.items():
        assert out[key].shape == shape and out[key].dtype == torch.float32, key
    loss = m.loss(out)
    assert loss.shape == () and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    for name, p in m.named_parameters():  # every parameter is wired into the loss
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_llip_init_follows_spec():
    torch.manual_seed(0)
    m = llip.create_model("llip-small")
    c = m.config
    for param, std in (
        (m.k_proj, c.vision_width**-0.5),
        (m.v_proj, c.vision_width**-0.5),
        (m.q_proj, c.text_width**-0.5),
        (m.w_out, c.D**-0.5),
        (m.visual.tokens, c.vision_width**-0.5),
        (m.visual.positional_embedding, c.vision_width**-0.5),
    ):
        assert param.std().item() == pytest.approx(std, rel=0.05)
    assert m.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert m.logit_bias.item() == -10.0


def hand_written_llip_logits(m, images, tokens):
    """docs/design.md section 1 written out from the model's parameters: per-token k/v projections, softmax over K per
    head at temperature tau, concat heads, W_out, cosine with y, t * cos + b."""
    c = m.config
    d = c.D // c.H
    h = m.visual(images)  # [B, K, W] (ln_post applied)
    g = m.text(tokens)  # [B, Wt]
    keys = torch.stack([h[:, i] @ m.k_proj[i] for i in range(c.K)], 1).view(-1, c.K, c.H, d)  # [B, K, H, d]
    vals = torch.stack([h[:, i] @ m.v_proj[i] for i in range(c.K)], 1).view(-1, c.K, c.H, d)
    q = (g @ m.q_proj).view(-1, c.H, d)  # [B, H, d]
    y = g @ m.text_projection  # [B, D]
    Bi, Bt = images.shape[0], tokens.shape[0]
    logits = torch.empty(Bi, Bt, dtype=h.dtype)
    for i in range(Bi):
        for j in range(Bt):
            heads = []
            for hh in range(c.H):
                a = torch.softmax(keys[i, :, hh] @ q[j, hh] / c.tau, dim=0)  # [K]
                heads.append(a @ vals[i, :, hh])  # [d]
            z = torch.cat(heads) @ m.w_out  # [D]
            logits[i, j] = m.logit_scale.exp() * F.cosine_similarity(z, y[j], dim=0) + m._bias()
    return logits


LLIP_PARAMS = ("k_proj", "v_proj", "q_proj", "w_out", "text_projection", "logit_scale", "visual.tokens")


def _hand_written_loss(m, images, tokens, loss):
    """The loss of :func:`hand_written_llip_logits` and its gradients w.r.t. ``LLIP_PARAMS``."""
    logits = hand_written_llip_logits(m, images, tokens)
    B = logits.shape[0]
    if loss == "sigmoid":
        labels = 2 * torch.eye(B, dtype=logits.dtype) - 1
        value = -F.logsigmoid(labels * logits).sum() / B
    else:
        target = torch.arange(B)
        value = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    return value, torch.autograd.grad(value, [m.get_parameter(p) for p in LLIP_PARAMS])


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_llip_loss_equals_hand_written(loss):
    """The model's loss (on whatever kernel backend dispatch picks) against the formula written out, judged by the
    numerics rule: float32 both ways, float64 as the oracle."""
    torch.manual_seed(1)
    m = llip.create_model("llip-tiny", loss=loss, K=5, H=4, tau=0.7)  # odd K, small tau: a peaked softmax
    images, tokens = make_batch(m, B=7)
    with torch.no_grad():
        m.w_out.mul_(3.0)  # non-unit scales, so normalisation matters
    ref64, ref64_grads = _hand_written_loss(copy.deepcopy(m).double(), images.double(), tokens, loss)
    same, same_grads = _hand_written_loss(m, images, tokens, loss)
    got = m.loss(m(images, tokens))
    got_grads = torch.autograd.grad(got, [m.get_parameter(p) for p in LLIP_PARAMS])
    check_rule("loss", got, ref64, same, torch.float32)
    for name, a, r, s in zip(LLIP_PARAMS, got_grads, ref64_grads, same_grads):
        check_rule(f"d{name}", a, r, s, torch.float32)


@pytest.mark.parametrize("kind", ["siglip", "clip", "register", "avg"])
def test_pooled_loss_equals_hand_written(kind):
    torch.manual_seed(2)
    m = llip.create_model(TINY[kind])
    images, tokens = make_batch(m, B=6)
    h = m.visual(images)  # [B, K, W]
    if kind == "avg":
        img = F.normalize(sum(h[:, k] @ m.image_projection[k] for k in range(m.config.K)) / m.config.K, dim=-1)
    else:
        img = F.normalize(h[:, 0] @ m.image_projection, dim=-1)
    txt = F.normalize(m.text(tokens) @ m.text_projection, dim=-1)
    logits = m.logit_scale.exp() * img @ txt.t()
    if kind == "clip":
        t = torch.arange(6)
        expected = (F.cross_entropy(logits, t) + F.cross_entropy(logits.t(), t)) / 2
    else:
        expected = -F.logsigmoid((2 * torch.eye(6) - 1) * (logits + m.logit_bias)).sum() / 6
    torch.testing.assert_close(m.loss(m(images, tokens)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qkv_norm", [False, True])
def test_bf16_autocast_forward(qkv_norm):
    torch.manual_seed(3)
    m = llip.create_model("llip-tiny", qkv_norm=qkv_norm)
    images, tokens = make_batch(m, B=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(images, tokens)
        loss = m.loss(out)
    # The outputs may mix dtypes (w_out is a float32 parameter, LayerNorm runs in float32): under autocast the op
    # casts them to bf16 itself, as autocast does a matmul's inputs.
    assert out["k"].dtype == torch.bfloat16 and out["w_out"].dtype == torch.float32
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(m.k_proj.grad).all() and m.k_proj.grad.dtype == torch.float32
    ref = m.loss(m(images, tokens))
    assert abs(loss.item() - ref.item()) < 0.05 * abs(ref.item())


def test_eot_pooling_ignores_padding_and_reads_the_caption():
    torch.manual_seed(4)
    m = llip.create_model("clip-tiny").eval()
    _, tokens = make_batch(m, B=3)
    other = tokens.clone()
    other[0, -1] = 7  # after row 0's end token (row 0 is short): causal mask, so no effect
    with torch.no_grad():
        a, b = m.encode_text(tokens), m.encode_text(other)
        torch.testing.assert_close(a[0], b[0])
        other[0, 1] = 123  # before it: changes the embedding
        assert not torch.allclose(m.encode_text(other)[0], a[0])


def test_gradient_checkpointing_matches():
    torch.manual_seed(5)
    m = llip.create_model("llip-tiny")
    images, tokens = make_batch(m, B=4)
    ref = m.loss(m(images, tokens))
    ref_grad = torch.autograd.grad(ref, m.visual.tokens)[0]
    m.set_grad_checkpointing(True)
    got = m.loss(m(images, tokens))
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(torch.autograd.grad(got, m.visual.tokens)[0], ref_grad)


def test_param_groups_and_logit_scale_clamp():
    m = llip.create_model("llip-tiny", qkv_norm=True)
    decay, no_decay = m.param_groups(0.2)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert ids(decay).isdisjoint(ids(no_decay)) and len(ids(decay) | ids(no_decay)) == len(list(m.parameters()))
    for p in (
        m.k_proj,
        m.v_proj,
        m.q_proj,
        m.w_out,
        m.visual.tokens,
        m.visual.conv1.weight,
        m.text.token_embedding.weight,
    ):
        assert id(p) in ids(decay)
    for p in (
        m.logit_scale,
        m.logit_bias,
        m.k_norm.weight,
        m.visual.ln_post.bias,
        m.visual.transformer.blocks[0].attn.in_proj.bias,
    ):
        assert id(p) in ids(no_decay)
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    m.clamp_logit_scale()
    assert m.logit_scale.item() == pytest.approx(math.log(100))


def test_logit_scale_is_kept_in_the_official_range():
    """The official code clamps the log-scale to [0, log(100)]: the multiplier t stays in [1, 100]."""
    m = llip.create_model("siglip-tiny")
    for value, expected in ((-1.0, 0.0), (0.5, 0.5), (10.0, math.log(100))):
        with torch.no_grad():
            m.logit_scale.fill_(value)
        m.clamp_logit_scale()
        assert m.logit_scale.item() == pytest.approx(expected)


def test_avg_projects_each_token_then_averages():
    """The official avg baseline: mean_k(h_k @ P_k) with one projection per token, P of shape [K, W, D]; not
    (mean_k h_k) @ P."""
    torch.manual_seed(4)
    m = llip.create_model("avg-tiny").double()
    c = m.config
    assert m.image_projection.shape == (c.K, c.vision_width, c.D)
    images, tokens = make_batch(m, B=3)
    images = images.double()
    with torch.no_grad():
        h = m.visual(images)  # [B, K, W]
        expected = torch.stack([sum(h[b, k] @ m.image_projection[k] for k in range(c.K)) / c.K for b in range(3)])
        check_same_result("avg image embedding", m.encode_image(images), expected, dtype=torch.float64,
                          terms=c.vision_width * c.K)  # fmt: skip
        shared_first = h.mean(1) @ m.image_projection.mean(0)  # what a single projection of the mean would give
        assert (m.encode_image(images) - shared_first).abs().max() > 1e-3


def test_vision_blocks_keep_pytorch_init_and_text_blocks_clip_init():
    """The official vision tower gives its blocks no init of their own (PyTorch's: nn.MultiheadAttention's
    Xavier-uniform in-projection with zero biases, nn.Linear's defaults elsewhere); the text tower has CLIP's.
    Standard deviations at the B/16 width, where the two differ most visibly (issue figures: 0.0255 vs 0.0361 ...)."""
    from llip.model.towers import Transformer

    torch.manual_seed(5)
    W = 768
    vision = Transformer(W, 1, 12, 4 * W, causal=False, activation="quick_gelu", init="pytorch").blocks[0]
    expected = {  # std of U(-a, a) is a / sqrt(3)
        "attn.in_proj.weight": (6 / (W + 3 * W)) ** 0.5 / 3**0.5,  # xavier_uniform_ on [3W, W]: 0.0255
        "attn.out_proj.weight": W**-0.5 / 3**0.5,  # nn.Linear default: 0.0208
        "mlp.0.weight": W**-0.5 / 3**0.5,  # 0.0208
        "mlp.2.weight": (4 * W) ** -0.5 / 3**0.5,  # 0.0104
    }
    for name, std in expected.items():
        p = vision.get_parameter(name)
        assert p.std().item() == pytest.approx(std, rel=0.02), name
        assert p.abs().max().item() <= std * 3**0.5  # uniform, not normal
    assert not vision.attn.in_proj.bias.any() and not vision.attn.out_proj.bias.any()
    assert 0 < vision.mlp[0].bias.abs().max().item() <= W**-0.5  # nn.Linear's default bias
    text = Transformer(W, 12, 12, 4 * W, causal=True, activation="quick_gelu", init="clip").blocks[0]
    assert text.attn.in_proj.weight.std().item() == pytest.approx(W**-0.5, rel=0.02)
    model = llip.create_model("llip-tiny")
    w = model.config.vision_width
    in_proj = model.visual.transformer.blocks[0].attn.in_proj.weight
    assert in_proj.abs().max().item() <= (6 / (w + 3 * w)) ** 0.5  # the model's vision tower uses it


def test_bad_inputs_raise_clear_errors():
    m = llip.create_model("llip-tiny")
    images, tokens = make_batch(m, B=2)
    with pytest.raises(ValueError, match=r"images of shape \[B, 3, 32, 32\].*got \[2, 3, 64, 64\]"):
        m(torch.randn(2, 3, 64, 64), tokens)
    with pytest.raises(ValueError, match=r"tokens of shape \[B, 32\].*got \[2, 77\].*tokenizer_for\(model\.config\)"):
        m(images, torch.zeros(2, 77, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        m(images, tokens.float())
    with pytest.raises(TypeError, match="float tensor"):
        m(images.to(torch.uint8), tokens)
    with pytest.raises(ValueError, match="pair up"):
        m(images, tokens[:1])


@pytest.mark.parametrize("kind", ["llip", "siglip", "clip"])
def test_loss_routes_to_the_global_batch_ops_when_distributed(kind, monkeypatch):
    # Pretend world size > 1 without a process group: llip_kernels.distributed then computes the local op, so
    # the routed loss must equal the local one (a wrong argument order would not).
    torch.manual_seed(6)
    m = llip.create_model(TINY[kind])
    out = m(*make_batch(m, B=5))
    local = m.loss(out)
    monkeypatch.setattr("llip.model.model._distributed", lambda: True)
    calls = []
    from llip_kernels import distributed as dist_ops

    for fn in ("llip_sigmoid_loss_distributed", "sigmoid_loss_distributed", "softmax_loss_distributed"):
        real = getattr(dist_ops, fn)
        monkeypatch.setattr(dist_ops, fn, lambda *a, _real=real, _fn=fn, **kw: calls.append(_fn) or _real(*a, **kw))
    torch.testing.assert_close(m.loss(out), local)
    expected = {"llip": "llip_sigmoid_loss_distributed", "siglip": "sigmoid_loss_distributed"}
    assert calls == [expected.get(kind, "softmax_loss_distributed")]


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_torch_multihead_attention(causal):
    # Our SDPA attention against nn.MultiheadAttention with the same fused weights (the layout of CLIP's
    # checkpoints): catches a wrong head split or a mask on the wrong side.
    from llip.model.towers import SelfAttention

    torch.manual_seed(7)
    ours = SelfAttention(48, heads=3)
    ref = torch.nn.MultiheadAttention(48, 3, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.in_proj.weight)
        ref.in_proj_bias.copy_(ours.in_proj.bias.normal_())
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias.normal_())
    x = torch.randn(2, 9, 48)
    mask = torch.full((9, 9), float("-inf")).triu(1) if causal else None
    expected = ref(x, x, x, attn_mask=mask, need_weights=False)[0]
    torch.testing.assert_close(ours(x, causal), expected, rtol=1e-5, atol=1e-5)
