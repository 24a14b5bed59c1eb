"""TransformerLens hook names of the residual stream and the other harvestable activations, in one place."""

from __future__ import annotations

from crosslayer.errors import CrosslayerError

HOOK_KINDS = {
    "resid_pre": "blocks.{}.hook_resid_pre",
    "resid_mid": "blocks.{}.hook_resid_mid",
    "resid_post": "blocks.{}.hook_resid_post",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "mlp_post": "blocks.{}.mlp.hook_post",
}
"""hook kind -> name pattern (``.format(layer)``)."""


def hook_name(kind: str, layer: int) -> str:
    """``hook_name("resid_post", 7)`` -> ``"blocks.7.hook_resid_post"``."""
    if kind not in HOOK_KINDS:
        raise CrosslayerError(f"unknown hook kind {kind!r}; use one of {', '.join(HOOK_KINDS)}")
    return HOOK_KINDS[kind].format(int(layer))


def block_index(hook: str) -> int | None:
    """``blocks.7.hook_resid_post`` -> 7; None for hooks outside the blocks (e.g. ``hook_embed``)."""
    parts = hook.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None
