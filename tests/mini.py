"""The smallest llip-tiny the trainer tests use (one block per tower, width 32: seconds per run), as config
overrides (``MINI``) and as the ``llip train`` arguments that set them (``MINI_ARGS``)."""

MINI = dict(
    patch_size=8, vision_width=32, vision_head_width=32, vision_layers=1, text_width=32, text_head_width=32,
    text_layers=1, context_length=16, K=4, H=2, D=32,
)  # fmt: skip
MINI_ARGS = [arg for key, value in MINI.items() for arg in ("--set", f"{key}={value}")]
