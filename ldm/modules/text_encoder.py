"""Frozen OpenCLIP text encoder: the prompt -> (B, 77, width) context that SD2.x cross-attends to.

Only the text tower is built (ViT-H-14's vision tower would be 630M unused parameters) and
nothing is ever downloaded: weights come from the SD2.1 checkpoint, whose `cond_stage_model.*`
names this module reproduces exactly. The architecture comes from open_clip's own model config
JSON and modules, so it stays bit-compatible with what SD2.1 was trained with. open_clip (and
the torchvision it loads, ~2 s) is imported where a tower is built or a prompt tokenised, not
by every tool that imports the model code (the baselines, --help).
"""
import contextlib
import math

import torch
import torch.nn as nn

LAYERS = {"last": 0, "penultimate": 1}  # how many final resblocks to skip


class OpenCLIPTextTower(nn.Module):
    """OpenCLIP's text half under the attribute names of an OpenCLIP `CLIP` model.

    SD2.x checkpoints store the text encoder as a whole `CLIP` minus `visual`, so the names
    are `token_embedding`, `transformer.resblocks.N`, `ln_final`, `text_projection` and
    `logit_scale` side by side. open_clip's `TextTransformer` has all but `logit_scale`, so we
    build one and hold its pieces directly rather than nesting it (which would add a prefix).
    """

    def __init__(self, context_length=77, vocab_size=49408, width=1024, heads=16, layers=24,
                 embed_dim=1024, mlp_ratio=4.0, quick_gelu=False):
        from open_clip.transformer import LayerNorm, QuickGELU, TextTransformer

        super().__init__()
        text = TextTransformer(
            context_length=context_length, vocab_size=vocab_size, width=width, heads=heads,
            layers=layers, mlp_ratio=mlp_ratio, output_dim=embed_dim,
            act_layer=QuickGELU if quick_gelu else nn.GELU, norm_layer=LayerNorm,
        )
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.transformer = text.transformer
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection
        # Unused for conditioning, but part of the checkpoint; CLIP's initial value.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # Rebuilt from the config, never stored: keeps checkpoints free of non-weights.
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    @property
    def batch_first(self):
        """Layout the resblocks expect; open_clip switched from (L, B, D) to (B, L, D) in 2.x."""
        return self.transformer.resblocks[0].attn.batch_first


def text_config(arch="ViT-H-14", **overrides):
    """Text-tower kwargs for `OpenCLIPTextTower` from open_clip's bundled model config JSON.

    `overrides` (width, heads, layers, ...) make tiny test configs; when the width is
    overridden the projection follows it, since the config's embed_dim was sized for the
    original width.
    """
    import open_clip

    cfg = open_clip.get_model_config(arch)  # local JSON shipped in the package, no network
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}")
    text = cfg["text_cfg"]
    unsupported = [k for k in ("hf_model_name", "embed_cls", "no_causal_mask", "ls_init_value",
                               "qk_norm", "block_type") if text.get(k)]
    if unsupported:
        raise ValueError(f"{arch}: text tower options {unsupported} are not supported")
    kw = dict(context_length=text.get("context_length", 77), vocab_size=text.get("vocab_size", 49408),
              width=text["width"], heads=text["heads"], layers=text["layers"],
              embed_dim=cfg["embed_dim"], mlp_ratio=text.get("mlp_ratio", 4.0),
              quick_gelu=cfg.get("quick_gelu", False))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "width" in overrides and "embed_dim" not in overrides:
        overrides["embed_dim"] = overrides["width"]
    kw.update(overrides)
    return kw


class FrozenOpenCLIPEmbedder(nn.Module):
    """Prompt -> per-token hidden states of the OpenCLIP text transformer (SD2.x conditioning).

    SD2.x uses the *penultimate* block's output (then ln_final), not the last one: the last
    block was trained to feed the pooled CLIP embedding and is worse as a per-token context.
    Frozen by default because ControlNet training keeps the text encoder locked.
    """

    def __init__(self, arch="ViT-H-14", layer="penultimate", max_length=77, width=None,
                 heads=None, layers=None, device=None, freeze=True):
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {sorted(LAYERS)}, got {layer!r}")
        self.layer, self.layer_idx, self.max_length = layer, LAYERS[layer], max_length
        cfg = text_config(arch, context_length=max_length, width=width, heads=heads, layers=layers)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.model = OpenCLIPTextTower(**cfg)
        self.frozen = freeze
        if freeze:
            self.requires_grad_(False)
        self.train(False)
        # encode_cached's embeddings, valid only for the weights, device and dtype they were
        # computed with: cleared when weights are loaded, and when the tower is moved or cast
        self._cache: dict[tuple[str, torch.dtype | None], torch.Tensor] = {}
        self._cache_for: tuple[torch.device, torch.dtype] | None = None
        self.register_load_state_dict_post_hook(FrozenOpenCLIPEmbedder._clear_cache)  # a function: picklable

    def _clear_cache(self, incompatible_keys) -> None:
        """load_state_dict post-hook: new weights, new embeddings."""
        self._cache.clear()

    def train(self, mode=True):
        """A frozen encoder stays in eval mode even when the parent model is put in training."""
        return super().train(mode and not self.frozen)

    @property
    def device(self):
        return self.model.token_embedding.weight.device

    def tokenize(self, texts):
        """open_clip's BPE (vocab bundled in the package): [SOT, tokens..., EOT, 0, ...]."""
        import open_clip

        return open_clip.tokenize(list(texts), context_length=self.max_length)

    def encode_tokens(self, tokens):
        """Token ids (B, L) -> context (B, L, width) after `ln_final`."""
        m = self.model
        x = m.token_embedding(tokens.to(self.device)) + m.positional_embedding
        blocks = m.transformer.resblocks[:len(m.transformer.resblocks) - self.layer_idx]
        if not m.batch_first:
            x = x.transpose(0, 1)
        for block in blocks:
            x = block(x, attn_mask=m.attn_mask)
        if not m.batch_first:
            x = x.transpose(0, 1)
        return m.ln_final(x)

    def encode(self, texts):
        """List of prompts -> (B, max_length, width) context."""
        if isinstance(texts, str):
            texts = [texts]
        return self.encode_tokens(self.tokenize(texts))

    forward = encode

    @torch.no_grad()
    def encode_cached(self, texts, max_cached: int = 64):
        """encode, each distinct prompt computed once and then reused (the first `max_cached`
        kept): the tower is frozen, so the cache is exact while weights, device, dtype and the
        autocast dtype, which changes the values, stay the same."""
        weight = self.model.token_embedding.weight
        if self._cache_for != (weight.device, weight.dtype):  # moved or cast since: recompute
            self._cache.clear()
            self._cache_for = (weight.device, weight.dtype)
        amp = _autocast_dtype(weight.device)
        rows = []
        for text in [texts] if isinstance(texts, str) else texts:
            row = self._cache.get((text, amp))
            if row is None:
                row = self.encode([text])[0]
                if len(self._cache) < max_cached:
                    self._cache[(text, amp)] = row
            rows.append(row)
        return torch.stack(rows)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype active for `device`'s type, or None."""
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except RuntimeError:  # device types without autocast support (meta)
        pass
    return None

