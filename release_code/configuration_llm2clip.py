"""The config of an LLM2CLIP model exported by this repository (hf_release.py): everything that rebuilds it.

Loaded by transformers as remote code (`AutoConfig.from_pretrained(folder, trust_remote_code=True)`);
`model_type` is ours, so transformers never mistakes the folder for one of its own CLIP models.
"""
from transformers import PretrainedConfig


class LLM2CLIPConfig(PretrainedConfig):
    """vision_model + timm_kwargs: the timm tower (its head is the projection into the shared space);
    text_dim -> embed_dim: the adaptor from the stage-1 encoder's pooled embedding; logit_scale: the trained
    multiplier of cosine similarities and logit_bias its bias (a sigmoid-loss run; None otherwise); llm2clip_text: the stage-1 encoder (`model`) and the settings its
    embeddings must be made with (`bidirectional`, `pooling`, `chat_template`, `instruction`, `max_length`)."""

    model_type = "llm2clip_timm"

    def __init__(self, vision_model="", timm_kwargs=None, embed_dim=0, text_dim=0, adaptor_blocks=4,
                 adaptor_expansion=2, logit_scale=100.0, logit_bias=None, llm2clip_text=None, **kwargs):
        self.vision_model, self.timm_kwargs = vision_model, dict(timm_kwargs or {})
        self.embed_dim, self.text_dim = embed_dim, text_dim
        self.adaptor_blocks, self.adaptor_expansion = adaptor_blocks, adaptor_expansion
        self.logit_scale, self.logit_bias, self.llm2clip_text = logit_scale, logit_bias, dict(llm2clip_text or {})
        super().__init__(**kwargs)
