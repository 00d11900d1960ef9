"""An LLM2CLIP model exported by this repository (hf_release.py), with the interface of the released
LLM2CLIP models (microsoft/LLM2CLIP-Openai-L-14-336, ...):

    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    image_features = model.get_image_features(pixel_values)   # CLIPImageProcessor(folder) output -> (B, D)
    text_features = model.get_text_features(embeddings)        # stage-1 pooled caption embeddings (B, C) -> (B, D)

Both are unnormalised, as the released models return them: L2-normalise and compare by dot product. The
tower is a timm model (pip install timm); the adaptor is the repository's model.Adaptor, written out here so
the folder needs nothing of the repository.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel

from .configuration_llm2clip import LLM2CLIPConfig


class MLPBlock(nn.Module):
    """Pre-LN residual MLP: x + W2(GELU(W1(LN(x))))."""

    def __init__(self, dim, expansion=2):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * expansion)
        self.fc2 = nn.Linear(dim * expansion, dim)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class Adaptor(nn.Module):
    """L2-normalise the LLM embedding, residual MLP blocks, LayerNorm, Linear(text_dim -> embed_dim)."""

    def __init__(self, in_dim, out_dim, num_blocks=4, expansion=2):
        super().__init__()
        self.blocks = nn.Sequential(*[MLPBlock(in_dim, expansion) for _ in range(num_blocks)])
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x):  # (B, in_dim) -> (B, out_dim)
        x = F.normalize(x.float(), dim=-1).to(self.proj.weight.dtype)  # a float16/bfloat16 load computes in its dtype
        return self.proj(self.norm(self.blocks(x)))


def _timm_tower(config):
    import timm
    return timm.create_model(config.vision_model, pretrained=False, **config.timm_kwargs)


class LLM2CLIPModel(PreTrainedModel):
    config_class = LLM2CLIPConfig
    base_model_prefix = "llm2clip"
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        self.vision = _timm_tower(config)
        self.text_adaptor = Adaptor(config.text_dim, config.embed_dim, config.adaptor_blocks, config.adaptor_expansion)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale)))
        self.post_init()

    def _init_weights(self, module):
        """Every parameter and buffer is in the checkpoint except timm's non-persistent buffers (EVA's rotary
        tables, fixed zero key biases), which transformers allocates empty: they are copied here from a fresh
        tower built once on the CPU."""
        own = [n for n, _ in module.named_buffers(recurse=False) if n in module._non_persistent_buffers_set]
        prefix = next((n for n, m in self.vision.named_modules() if m is module), None) if own else None
        if prefix is None:
            return
        if "_fresh_buffers" not in self.__dict__:
            with torch.device("cpu"):
                self.__dict__["_fresh_buffers"] = dict(_timm_tower(self.config).named_buffers())
        with torch.no_grad():
            for n in own:
                getattr(module, n).copy_(self._fresh_buffers[f"{prefix}.{n}".lstrip(".")])

    def get_image_features(self, pixel_values):  # (B, 3, H, W) -> (B, D)
        return self.vision(pixel_values.to(self.logit_scale.dtype))

    def get_text_features(self, embeddings):  # (B, text_dim) -> (B, D)
        return self.text_adaptor(embeddings)

    def forward(self, pixel_values=None, embeddings=None):
        """Features of what is given, and with both the image-text logits (logit_scale x cosine + logit_bias)."""
        out = {}
        if pixel_values is not None:
            out["image_embeds"] = F.normalize(self.get_image_features(pixel_values), dim=-1)
        if embeddings is not None:
            out["text_embeds"] = F.normalize(self.get_text_features(embeddings), dim=-1)
        if len(out) == 2:
            out["logits_per_image"] = self.logit_scale.exp() * out["image_embeds"] @ out["text_embeds"].T
            if self.config.logit_bias is not None:
                out["logits_per_image"] = out["logits_per_image"] + self.config.logit_bias
            out["logits_per_text"] = out["logits_per_image"].T
        return out
