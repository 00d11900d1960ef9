"""Tiny models built offline (no hub): a tokenizer trained on the fly and random HF text models.

Used by the tests and by the tiny end-to-end pipeline; everything is saved with save_pretrained and
loaded back through the real from_pretrained path.
"""
import os

TINY_ARCHS = ("llama", "qwen2", "mistral", "gemma", "bert")


def train_tokenizer(texts, vocab_size=512, style="decoder"):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as a transformers fast tokenizer.

    style="decoder": adds BOS only, no pad token (like Llama-3); style="encoder": [CLS] text [SEP], with [PAD].
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    if style == "decoder":
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    else:
        specials = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
                    "mask_token": "[MASK]"}
    tok = Tokenizer(models.BPE(unk_token=specials["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    if style == "decoder":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    else:
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def tiny_text_config(arch, vocab_size, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                     max_position_embeddings=512, tokenizer=None):
    """A transformers config for a tiny random model of the given architecture."""
    import transformers as T
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, intermediate_size=intermediate_size,
                  max_position_embeddings=max_position_embeddings)
    ids = {}
    if tokenizer is not None:
        ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if getattr(tokenizer, k, None) is not None}
    if arch == "bert":
        return T.BertConfig(**common, **ids)
    cls = {"llama": T.LlamaConfig, "qwen2": T.Qwen2Config, "mistral": T.MistralConfig, "gemma": T.GemmaConfig}[arch]
    extra = {"num_key_value_heads": 2}
    if arch == "gemma":
        extra["head_dim"] = hidden_size // num_heads
    return cls(**common, **extra, **ids)


def build_tiny_text_model(out_dir, arch="llama", texts=None, vocab_size=512, seed=0, **config_kwargs):
    """Save a tiny random `arch` model (AutoModel base, no LM head) + trained tokenizer to out_dir."""
    import torch
    from transformers import AutoModel
    if arch not in TINY_ARCHS:
        raise ValueError(f"arch={arch!r}; expected one of {TINY_ARCHS}")
    texts = list(texts) if texts else _DEFAULT_CORPUS
    tokenizer = train_tokenizer(texts, vocab_size, style="encoder" if arch == "bert" else "decoder")
    # margin: some Auto tokenizer classes (Qwen2) add a special token or two when they load the files back
    config = tiny_text_config(arch, len(tokenizer) + 32, tokenizer=tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


_DEFAULT_CORPUS = [
    "a red circle on a white background", "two blue squares next to a green triangle",
    "a small yellow star in the top left corner", "the quick brown fox jumps over the lazy dog",
    "a man riding a bicycle down a city street", "a plate of food with broccoli and rice",
    "people standing on a beach near the ocean", "a cat sleeping on a wooden table",
] * 4
