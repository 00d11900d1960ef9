"""LLM2CLIP building blocks, self-contained (torch, transformers, peft, timm only) so it can be copied.

1. The LLM caption encoder: a HF text model (decoder LLM or BERT-like encoder) with bidirectional
   attention, mean/eos pooling over the text tokens only (an instruction is attended to, never
   pooled), and LoRA through peft.
2. The adaptor: L2-normalised LLM embedding -> pre-LN residual MLP blocks -> LN -> Linear.
3. The vision tower: a timm model with its own preprocessing config.
4. The CLIP-style model (vision + adaptor + learnable logit scale) and the two contrastive losses,
   correct under DDP (features gathered with gradient, local rows, labels offset by rank).
5. Gradient caching: a contrastive step over a batch larger than one forward pass, with the full
   batch's negatives and gradient (both stages use it).
"""
import contextlib
import json
import math
import os
import re

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# LoRA targets (paper: q,k,v,o,gate,up,down). BERT-likes name the same projections differently.
DECODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ENCODER_LORA_TARGETS = ["query", "key", "value", "dense"]
ENCODER_CONFIG = "encoder.json"  # written by cc_finetune.py next to the merged model and the adapter
LLM2CLIP_CONFIG = "llm2clip.json"  # written by post_train.py next to the exported vision tower + adaptor


# -----------------------------------------------------------------------------
# Pooling

def mean_pool(hidden, mask):
    """Mean of hidden (B, T, C) over positions where mask (B, T) is 1, in float32. -> (B, C)"""
    m = mask.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)


def eos_pool(hidden, mask):
    """Hidden state at the last position where mask is 1 (works for left and right padding). -> (B, C)"""
    T = mask.shape[1]
    last = T - 1 - mask.long().flip(1).argmax(1)  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()


POOLERS = {"mean": mean_pool, "eos": eos_pool}


# -----------------------------------------------------------------------------
# Bidirectional attention for HF decoders

def _attention_modules(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base, [m for m in base.modules() if isinstance(getattr(m, "is_causal", None), bool)]


def is_causal_model(model):
    """True if any attention module of the HF model is causal right now."""
    return any(m.is_causal for m in _attention_modules(model)[1])


def is_decoder_model(model):
    """True for a decoder LLM, causal or already made bidirectional (enable_bidirectional sets
    config.is_causal = False; BERT-like configs have no such attribute)."""
    base = _attention_modules(model)[0]
    return is_causal_model(model) or getattr(base.config, "is_causal", None) is False


def enable_bidirectional(model, verify=True):
    """Make a HF decoder attend bidirectionally, for eager, sdpa and flash_attention_2.

    transformers 5.x builds its masks in `masking_utils`: `config.is_causal = False` makes
    `create_causal_mask` return a padding-only (bidirectional) mask, and every attention module's
    `is_causal` flag decides what sdpa (when the mask is skipped: batch 1, no padding) and flash
    attention do. Both are switched off here. With `verify=True` a probe checks that the first
    token's output depends on the last token, so a transformers version whose internals differ
    fails loudly instead of silently staying causal. Returns the model (modified in place).
    """
    base, modules = _attention_modules(model)
    for cfg in [base.config] + [getattr(base.config, k) for k in ("text_config",) if hasattr(base.config, k)]:
        cfg.is_causal = False
        if hasattr(cfg, "use_bidirectional_attention"):
            cfg.use_bidirectional_attention = True
    for m in modules:
        m.is_causal = False
    if verify and not attends_bidirectionally(model):
        raise RuntimeError(
            f"enable_bidirectional: {type(base).__name__} (attn_implementation="
            f"{getattr(base.config, '_attn_implementation', '?')}) is still causal after the patch; "
            "this transformers version builds masks differently. Install the range in requirements.txt.")
    return model


@torch.no_grad()
def attends_bidirectionally(model, length=6):
    """Probe: does position 0's last hidden state change when only the last token changes? (batch 1, no padding)"""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(base.parameters()).device
    vocab = base.config.get_text_config().vocab_size if hasattr(base.config, "get_text_config") else base.config.vocab_size
    ids = torch.arange(1, length + 1, device=device).remainder(vocab - 1).add(1).unsqueeze(0)  # (1, T)
    ids2 = ids.clone()
    ids2[0, -1] = ids[0, -1] % (vocab - 1) + 1
    was_training = model.training
    model.eval()
    h1 = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, 0].float()
    h2 = model(input_ids=ids2, output_hidden_states=True).hidden_states[-1][0, 0].float()
    model.train(was_training)
    return not torch.allclose(h1, h2, rtol=0, atol=1e-6 * max(1.0, h1.abs().max().item()))


# -----------------------------------------------------------------------------
# LoRA (peft)

def default_lora_targets(model):
    return DECODER_LORA_TARGETS if is_decoder_model(model) else ENCODER_LORA_TARGETS


def attach_lora(model, r=16, alpha=32, dropout=0.05, target_modules=None):
    """Wrap a HF model with peft LoRA adapters (paper: r=16, alpha=32, dropout 0.05). Returns a PeftModel."""
    from peft import LoraConfig, get_peft_model
    targets = target_modules or default_lora_targets(model)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    return get_peft_model(model, config)


def merge_lora(model):
    """Fold LoRA weights into the base model and drop the peft wrapper (same outputs, faster)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


# -----------------------------------------------------------------------------
# The text encoder

# Chat wrappings of the official code (microsoft/LLM2CLIP, llm2vec's prepare_for_tokenization): every
# caption (and instruction) is put in one user turn; the closing token is pooled with the text. Its
# released Llama-3 stage-1 weights and caption embeddings were made with "llama3".
CHAT_TEMPLATES = {"llama3": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>")}


class TextEncoder(nn.Module):
    """A HF text model as a caption encoder: forward(input_ids, attention_mask, embed_mask) -> (B, C).

    Sequences are laid out as [tokenizer prefix] [chat head] [instruction] [text] [chat tail]
    [tokenizer suffix]; the pooled span (`embed_mask`) is the text, the chat tail (e.g. <|eot_id|>) and
    the suffix (e.g. EOS), and for BERT-like encoders also the prefix ([CLS]), which is what
    sentence-transformers' mean pooling does. A decoder's BOS is never pooled (its state is an
    attention sink with an outsized norm). The instruction is never pooled. With an instruction the
    tokens are those of the joined string `instruction + " " + text` (as llm2vec tokenises it), so a
    byte-level BPE text keeps its first word's leading-space token; the text span is found by offsets.
    chat_template: "" (none) or a key of CHAT_TEMPLATES.
    """

    def __init__(self, model, tokenizer, pooling="mean", settings=None, chat_template=""):
        super().__init__()
        if pooling not in POOLERS:
            raise ValueError(f"pooling={pooling!r}; expected one of {sorted(POOLERS)}")
        if chat_template and chat_template not in CHAT_TEMPLATES:
            raise ValueError(f"chat_template={chat_template!r}; expected '' or one of {sorted(CHAT_TEMPLATES)}")
        self.model, self.tokenizer, self.pooling = model, tokenizer, pooling
        self.chat_template = chat_template or ""
        self.settings = dict(settings or {})
        self.is_decoder = is_decoder_model(model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.prefix, self.suffix = _special_affixes(tokenizer)
        if pooling == "eos" and self.is_decoder and tokenizer.eos_token_id is not None \
                and self.suffix[-1:] != [tokenizer.eos_token_id]:
            self.suffix = self.suffix + [tokenizer.eos_token_id]  # eos pooling needs an EOS to pool
        self.pool_prefix = not self.is_decoder
        self.chat = CHAT_TEMPLATES[self.chat_template] if self.chat_template else ("", "")
        for piece in self.chat:  # each special token of the wrapping must be one token of this vocabulary
            for tok in re.findall(r"<\|[^|]+\|>", piece):
                ids = tokenizer(tok, add_special_tokens=False)["input_ids"]
                if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
                    raise ValueError(f"chat_template={chat_template!r}: {tok} is not a special token of this "
                                     f"tokenizer ({type(tokenizer).__name__}); use it with a Llama-3 tokenizer")
        self.adaptor = None  # optional stage-1 Adaptor on the pooled output (cc_finetune cc_adaptor_blocks)
        # texts seen, texts cut to max_length, tokens dropped, most dropped from one text: each stage logs
        # them (pop_truncation + common.describe_truncation) instead of truncating silently
        self.truncation = dict(texts=0, truncated=0, tokens_cut=0, max_cut=0)

    def pop_truncation(self):
        """The truncation counts since the last call (then reset to zero)."""
        out, self.truncation = self.truncation, dict.fromkeys(self.truncation, 0)
        return out

    @property
    def dim(self):
        if self.adaptor is not None:
            return self.adaptor.out_dim
        cfg = self.model.config
        return cfg.get_text_config().hidden_size if hasattr(cfg, "get_text_config") else cfg.hidden_size

    @property
    def device(self):
        return next(self.model.parameters()).device

    def tokenize(self, texts, instruction=None, max_length=512):
        """Right-padded batch: dict of input_ids, attention_mask, embed_mask (LongTensors, (B, T))."""
        texts = list(texts)
        return self._pack(self.split_tokens(texts, instruction), max_length, texts, range(len(texts)))

    def split_tokens(self, texts, instruction=None):
        """Per text, (head ids, text ids, tail ids) without the tokenizer's special affixes: head = chat
        head + instruction (not pooled), tail = chat tail (pooled). Without either, the text alone."""
        head = self.chat[0] + (instruction.strip() + " " if instruction else "")
        tail = self.chat[1]
        if not head and not tail:
            return [([], ids, []) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        if not getattr(self.tokenizer, "is_fast", False):  # no offsets: the pieces tokenised apart
            h, t = (self.tokenizer(x, add_special_tokens=False)["input_ids"] if x else [] for x in (head, tail))
            return [(h, ids, t) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        enc = self.tokenizer([head + x + tail for x in texts], add_special_tokens=False, return_offsets_mapping=True)
        out, a = [], len(head)
        for x, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"]):
            b = a + len(x)  # the text is chars [a, b) of the joined string; a token touching it is text
            kinds = [0 if e <= a else (2 if s >= b else 1) for s, e in offsets]
            out.append(tuple([i for i, k in zip(ids, kinds) if k == want] for want in (0, 1, 2)))
        return out

    def lengths(self, texts, instruction=None, max_length=512):
        """Tokens per text exactly as `tokenize` lays them out (special tokens, instruction, truncation)."""
        fixed = len(self.prefix) + len(self.suffix)
        return [min(len(h) + len(b) + len(t) + fixed, max_length) for h, b, t in self.split_tokens(texts, instruction)]

    def _pack(self, parts, max_length, texts, index):
        """Lay out already-split texts (parts[k] = (head, body, tail) of texts[index[k]]) as a right-padded batch."""
        seqs, pools = [], []
        for (head, body, tail), i in zip(parts, index):
            if not body:
                raise ValueError(f"text {i} is empty ({texts[i]!r}); every caption needs at least one token")
            budget = max_length - len(self.prefix) - len(head) - len(tail) - len(self.suffix)
            if budget < 1:
                raise ValueError(f"max_length={max_length} leaves no room for text after the instruction, "
                                 f"chat template and special tokens")
            t = self.truncation
            t["texts"] += 1
            if len(body) > budget:
                t["truncated"] += 1
                t["tokens_cut"] += len(body) - budget
                t["max_cut"] = max(t["max_cut"], len(body) - budget)
                body = body[:budget]
            seqs.append(self.prefix + head + body + tail + self.suffix)
            pools.append([int(self.pool_prefix)] * len(self.prefix) + [0] * len(head)
                         + [1] * (len(body) + len(tail) + len(self.suffix)))
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        att = torch.zeros((len(seqs), T), dtype=torch.long)
        emb = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, (s, p) in enumerate(zip(seqs, pools)):
            ids[i, :len(s)] = torch.tensor(s)
            att[i, :len(s)] = 1
            emb[i, :len(p)] = torch.tensor(p)
        return {"input_ids": ids, "attention_mask": att, "embed_mask": emb}

    def hidden_states(self, input_ids, attention_mask):
        """Last hidden states (B, T, C) of the (bidirectional) model, before pooling."""
        # positions from the mask, so a left-padded text gets the same positions as alone
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, T, C)

    def forward(self, input_ids, attention_mask, embed_mask=None, pool=True):
        """-> (B, C) pooled (through the stage-1 adaptor, if any); pool=False -> (hidden (B, T, C), pool
        mask (B, T)) for a token-level adaptor."""
        hidden = self.hidden_states(input_ids, attention_mask)  # (B, T, C)
        mask = attention_mask if embed_mask is None else embed_mask * attention_mask
        if not pool:
            if self.adaptor is not None:
                raise ValueError("pool=False: this encoder's stage-1 adaptor works on pooled embeddings only")
            return hidden, mask
        pooled = POOLERS[self.pooling](hidden, mask)
        return pooled if self.adaptor is None else self.adaptor(pooled)

    @torch.no_grad()
    def encode(self, texts, instruction=None, max_length=512, batch_size=64, show_progress=False):
        """Embed raw strings -> (N, C) float32 on CPU, in input order. Batches are length-sorted."""
        texts = list(texts)
        parts = self.split_tokens(texts, instruction)  # tokenised once
        order = sorted(range(len(texts)), key=lambda i: -len(parts[i][1]))
        out = torch.empty((len(texts), self.dim), dtype=torch.float32)
        was_training = self.training
        self.eval()
        starts = range(0, len(texts), batch_size)
        if show_progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc="encode", unit="batch")
        device = self.device
        for s in starts:
            idx = order[s:s + batch_size]
            batch = self._pack([parts[i] for i in idx], max_length, texts, idx)
            batch = {k: v.to(device) for k, v in batch.items()}
            out[idx] = self(**batch).float().cpu()
        self.train(was_training)
        return out


def _special_affixes(tokenizer):
    """The special tokens this tokenizer puts before and after a text, found by tokenizing a probe."""
    probe = "hello world"
    full = tokenizer(probe)["input_ids"]
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return list(full[:i]), list(full[i + len(bare):])
    return [], []


def _resolve_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[str(dtype)]


def load_text_encoder(name_or_path, *, bidirectional=None, pooling=None, lora=None, dtype=None,
                      attn_implementation=None, device=None, chat_template=None):
    """Load a HF model (local folder or hub name) or a cc_finetune.py out_dir as a `TextEncoder`.

    - a stage-1 out_dir (has `encoder.json`): its merged model and the bidirectional, pooling and
      chat_template settings it was trained with are used unless overridden here; `encoder.settings`
      also holds its instruction and max_length.
    - bidirectional (None = the out_dir's, else True): applied to decoders (verified); BERT-likes
      already are. False keeps a decoder causal (to score a raw LLM as it was trained).
    - pooling (None = the out_dir's, else "mean"); chat_template (None = the out_dir's, else none;
      "" or "none" = none; a key of CHAT_TEMPLATES, e.g. "llama3").
    - lora: None, a dict of `attach_lora` kwargs (fresh trainable adapters), or a saved adapter folder.
    - dtype: torch dtype or "bfloat16"/"float32"; attn_implementation: "eager", "sdpa", "flash_attention_2".
    - a stage-1 adaptor named in encoder.json (`cc_adaptor_blocks`) is loaded and applied by forward/encode.
    """
    from transformers import AutoModel, AutoTokenizer
    settings = {}
    path = name_or_path
    if os.path.isfile(os.path.join(name_or_path, ENCODER_CONFIG)):
        settings = _read_json(os.path.join(name_or_path, ENCODER_CONFIG))
        path = os.path.join(name_or_path, settings.get("model_subdir", "merged"))
    bidirectional = settings.get("bidirectional", True) if bidirectional is None else bidirectional
    pooling = settings.get("pooling", "mean") if pooling is None else pooling
    chat_template = settings.get("chat_template") or "" if chat_template is None else chat_template
    chat_template = "" if chat_template == "none" else chat_template
    kwargs = {"dtype": _resolve_dtype(dtype)} if dtype is not None else {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModel.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # Llama-3 has none; pad positions are masked out anyway
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if device is not None:
        model.to(device)
    decoder = is_decoder_model(model)
    if bidirectional and decoder:
        enable_bidirectional(model)
    if isinstance(lora, dict):
        model = attach_lora(model, **lora)
    elif isinstance(lora, str):
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, lora, is_trainable=True)
    settings.update({"name_or_path": name_or_path, "pooling": pooling, "chat_template": chat_template,
                     "bidirectional": bool(bidirectional and decoder), "decoder": decoder})
    encoder = TextEncoder(model, tokenizer, pooling=pooling, settings=settings, chat_template=chat_template)
    if settings.get("adaptor"):  # a stage-1 adaptor trained on the frozen (or LoRA-tuned) LLM
        encoder.adaptor = load_adaptor(name_or_path, settings["adaptor"]).to(next(model.parameters()).device)
    return encoder


# -----------------------------------------------------------------------------
# Adaptor: LLM embedding -> CLIP space

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
    """L2-normalise the LLM embedding, `num_blocks` residual MLP blocks, LayerNorm, Linear(in_dim -> out_dim).

    num_blocks is the paper's Table 8 ablation (0, 1, 2, 4); 0 is a plain LN + Linear.
    """

    def __init__(self, in_dim, out_dim, num_blocks=4, expansion=2):
        super().__init__()
        self.in_dim, self.out_dim, self.num_blocks, self.expansion = in_dim, out_dim, num_blocks, expansion
        self.blocks = nn.Sequential(*[MLPBlock(in_dim, expansion) for _ in range(num_blocks)])
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x):  # (B, in_dim) -> (B, out_dim)
        x = F.normalize(x.float(), dim=-1)
        return self.proj(self.norm(self.blocks(x)))


class TransformerAdaptor(nn.Module):
    """Table 8's "Transformer x1": `num_layers` pre-LN Transformer layers (width in_dim, MLP expansion x in_dim,
    GELU) over the LLM's token states, masked mean pooling, LayerNorm, Linear(in_dim -> out_dim).

    Needs the token states (B, T, in_dim), not a pooled embedding, so it only runs with the LLM online
    (a cache of token states would hold T x in_dim values per caption). At in_dim=2048 -> 1280 with
    expansion 4 it has 52.98M parameters: 12 d^2 per layer plus the projection.
    """
    takes_tokens = True

    def __init__(self, in_dim, out_dim, num_layers=1, expansion=4, head_dim=64):
        super().__init__()
        heads = max(1, in_dim // head_dim)  # a tiny test width gets one head
        if in_dim % heads:
            raise ValueError(f"TransformerAdaptor: in_dim={in_dim} is not a multiple of head_dim={head_dim}")
        self.in_dim, self.out_dim, self.num_layers, self.expansion = in_dim, out_dim, num_layers, expansion
        self.layers = nn.ModuleList([nn.TransformerEncoderLayer(in_dim, heads, expansion * in_dim, dropout=0.0,
                                                                activation="gelu", batch_first=True, norm_first=True)
                                     for _ in range(num_layers)])
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, states, mask):  # (B, T, in_dim), (B, T) 1 = pooled token -> (B, out_dim)
        x = states.float()
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=mask == 0)
        return self.proj(self.norm(mean_pool(x, mask)))


def build_adaptor(kind, in_dim, out_dim, num_blocks=4, expansion=2):
    """`adaptor` config value -> module: "linear" (the MLP `Adaptor`, the paper's default) or "transformer"."""
    if kind == "linear":
        return Adaptor(in_dim, out_dim, num_blocks, expansion)
    if kind == "transformer":
        if num_blocks < 1:
            raise ValueError(f"adaptor='transformer' needs adaptor_blocks >= 1 (its layers), got {num_blocks}")
        return TransformerAdaptor(in_dim, out_dim, num_layers=num_blocks, expansion=expansion)
    raise ValueError(f"adaptor={kind!r}; expected 'linear' or 'transformer'")


def adaptor_spec(adaptor):
    """The constructor arguments that rebuild `adaptor` with build_adaptor (recorded in llm2clip.json)."""
    if isinstance(adaptor, TransformerAdaptor):
        return {"kind": "transformer", "in_dim": adaptor.in_dim, "out_dim": adaptor.out_dim,
                "num_blocks": adaptor.num_layers, "expansion": adaptor.expansion}
    return {"kind": "linear", "in_dim": adaptor.in_dim, "out_dim": adaptor.out_dim, "num_blocks": adaptor.num_blocks,
            "expansion": adaptor.expansion}


# -----------------------------------------------------------------------------
# CLIP's own text tower (CLIP-T) and the concatenation head (Table 10 b-d)

class CLIPText(nn.Module):
    """A pretrained CLIP/SigLIP text tower with its projection: forward(clip_ids, clip_mask) -> (B, dim).

    `tokenize` truncates to the tower's context (77 for CLIP, 64 for SigLIP); SigLIP was trained with
    max-length padding, so it pads to that length (as its processor does), CLIP to the longest text.
    """

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        cfg = model.config
        self.siglip = "siglip" in cfg.model_type
        self.max_length = getattr(cfg, "max_position_embeddings", 77)
        self.dim = getattr(cfg, "projection_dim", None) if not self.siglip else cfg.hidden_size

    def tokenize(self, texts):
        tok = self.tokenizer(list(texts), padding="max_length" if self.siglip else True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        out = {"clip_ids": tok["input_ids"]}
        if "attention_mask" in tok and not self.siglip:  # SigLIP attends to its padding, as in training
            out["clip_mask"] = tok["attention_mask"]
        return out

    def forward(self, clip_ids, clip_mask=None):
        out = self.model(input_ids=clip_ids, attention_mask=clip_mask)
        return out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output  # (B, dim)

    @torch.no_grad()
    def encode(self, texts, batch_size=256):
        """Raw strings -> L2-normalised (N, dim), in input order."""
        device = next(self.parameters()).device
        feats = []
        for s in range(0, len(texts), batch_size):
            tok = {k: v.to(device) for k, v in self.tokenize(texts[s:s + batch_size]).items()}
            feats.append(F.normalize(self(**tok).float(), dim=-1))
        return torch.cat(feats) if feats else torch.zeros(0, self.dim)

    def save_pretrained(self, path):
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


class OpenCLIPText(CLIPText):
    """CLIP-T of an open_clip model (EVA02-CLIP and other families transformers lacks), with CLIPText's
    interface. Built by evaluate.load_open_clip_text: open_clip is an optional dependency and never imported
    here. The vision tower is dropped; open_clip's tokenizer pads to its context (77) and the tower finds the
    end-of-text token itself, so there is no mask."""

    def __init__(self, model, tokenizer, name, dim):
        nn.Module.__init__(self)
        model.visual = None  # CLIP-T only
        self.model, self.tokenizer, self.name, self.dim, self.siglip = model, tokenizer, name, dim, False

    def tokenize(self, texts):
        return {"clip_ids": self.tokenizer(list(texts))}

    def forward(self, clip_ids, clip_mask=None):
        return self.model.encode_text(clip_ids)

    def save_pretrained(self, path):
        """open_clip.json (model name, dim) + the text tower's state dict: what load_open_clip_text rebuilds."""
        os.makedirs(path, exist_ok=True)
        torch.save(self.model.state_dict(), os.path.join(path, "open_clip_text.pt"))
        with open(os.path.join(path, "open_clip.json"), "w") as f:
            json.dump({"open_clip": self.name, "dim": self.dim, "file": "open_clip_text.pt"}, f)


def load_clip_text(name_or_path, device=None):
    """The text tower + projection of a transformers CLIPModel / SiglipModel / Siglip2Model folder or hub
    name (or of a folder this function's CLIPText.save_pretrained wrote) -> CLIPText. The vision weights
    in the checkpoint are skipped (the text classes share the full model's weight names)."""
    from transformers import AutoConfig, AutoTokenizer
    import transformers
    config = AutoConfig.from_pretrained(name_or_path)
    model_type = config.model_type
    classes = {"clip": "CLIPTextModelWithProjection", "clip_text_model": "CLIPTextModelWithProjection",
               "siglip": "SiglipTextModel", "siglip_text_model": "SiglipTextModel",
               "siglip2": "Siglip2TextModel", "siglip2_text_model": "Siglip2TextModel"}
    if model_type not in classes:
        raise ValueError(f"clip_text={name_or_path!r}: model_type {model_type!r} is not a transformers CLIP/SigLIP "
                         f"model (expected one of {sorted(classes)}); other families load through open_clip")
    if hasattr(config, "text_config"):  # a full CLIP/SigLIP: its text part (CLIP keeps projection_dim at the top)
        text_config = config.text_config
        if hasattr(config, "projection_dim"):
            text_config.projection_dim = config.projection_dim
        config = text_config
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the checkpoint's vision weights are skipped on purpose
    try:
        model = getattr(transformers, classes[model_type]).from_pretrained(name_or_path, config=config)
    finally:
        transformers.logging.set_verbosity(verbosity)
    tower = CLIPText(model, AutoTokenizer.from_pretrained(name_or_path))
    return tower.to(device) if device is not None else tower


class CatHead(nn.Module):
    """Table 10 (d): Linear over the concatenated L2-normalised LLM-side and CLIP-T features -> joint space."""

    def __init__(self, llm_dim, clip_dim, out_dim):
        super().__init__()
        self.llm_dim, self.clip_dim, self.out_dim = llm_dim, clip_dim, out_dim
        self.proj = nn.Linear(llm_dim + clip_dim, out_dim)

    def forward(self, llm, clip):  # (B, llm_dim), (B, clip_dim) -> (B, out_dim)
        return self.proj(torch.cat([F.normalize(llm.float(), dim=-1), F.normalize(clip.float(), dim=-1)], -1))


# -----------------------------------------------------------------------------
# Stage-1 ablations (cc_finetune.py `objective`, `dropout`, `cc_adaptor_blocks`, per-record instructions)

CC_ADAPTOR_FILE = "cc_adaptor.pt"  # a stage-1 adaptor's state dict, next to encoder.json


def read_encoder_config(out_dir):
    """encoder.json of a cc_finetune.py out_dir; a clear error if `out_dir` is not one."""
    path = os.path.join(out_dir, ENCODER_CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"{out_dir}: no {ENCODER_CONFIG}; expected a cc_finetune.py out_dir")
    with open(path) as f:
        return json.load(f)


def load_adaptor(out_dir, meta):
    """The stage-1 Adaptor that encoder.json's `adaptor` entry (file, in_dim, out_dim, num_blocks, expansion) names."""
    adaptor = Adaptor(meta["in_dim"], meta["out_dim"], meta["num_blocks"], meta["expansion"])
    adaptor.load_state_dict(torch.load(os.path.join(out_dir, meta["file"]), map_location="cpu", weights_only=True))
    return adaptor


def set_dropout(model, p):
    """Set every attention and hidden dropout of a HF model to p (SimCSE's noise: LoRA dropout alone is
    not it). nn.Dropout modules outside LoRA, and attention modules' `attention_dropout` (Llama, Qwen,
    Mistral, Gemma apply no other dropout), plus the config fields for the record. Returns the number of
    places set; raises if the model has none (then p would silently do nothing)."""
    n = 0
    for name, m in model.named_modules():
        if "lora_dropout" in name:
            continue
        if isinstance(m, nn.Dropout):
            m.p, n = p, n + 1
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout, n = p, n + 1
    if n == 0:
        raise ValueError(f"set_dropout: {type(model).__name__} has no dropout module or attention_dropout to set")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for k in ("attention_dropout", "hidden_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob"):
        if hasattr(base.config, k):
            setattr(base.config, k, p)
    return n


def tokenize_mixed(encoder, texts, instructions, max_length=512):
    """Like `encoder.tokenize`, with one instruction per text (None: none): each text is laid out
    exactly as `encoder.tokenize([text], its_instruction)` would (the instruction attended, not pooled),
    rows right-padded to one length. Used for per-record instructions (E5-style pure-text pairs)."""
    texts, instructions = list(texts), list(instructions)
    groups = {}
    for i, ins in enumerate(instructions):
        groups.setdefault(ins, []).append(i)
    if len(groups) == 1:
        return encoder.tokenize(texts, instructions[0] if instructions else None, max_length)
    parts = [(rows, encoder.tokenize([texts[i] for i in rows], ins, max_length)) for ins, rows in groups.items()]
    T = max(b["input_ids"].shape[1] for _, b in parts)
    out = {"input_ids": torch.full((len(texts), T), encoder.pad_id, dtype=torch.long),
           "attention_mask": torch.zeros((len(texts), T), dtype=torch.long),
           "embed_mask": torch.zeros((len(texts), T), dtype=torch.long)}
    for rows, b in parts:
        for k, v in b.items():
            out[k][rows, :v.shape[1]] = v
    return out


def mntp_mask_token_id(tokenizer):
    """The token MNTP masks with: the tokenizer's mask token, else "_" (llm2vec's choice for Llama/Mistral)."""
    if tokenizer.mask_token_id is not None:
        return tokenizer.mask_token_id
    ids = tokenizer("_", add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError("mntp: the tokenizer has no mask token and '_' is not a single token; set tokenizer.mask_token")
    return ids[0]


def mntp_mask(input_ids, maskable, mask_token_id, vocab_size, prob=0.2, seeds=None):
    """llm2vec's MNTP corruption (BERT's 80/10/10 rule) -> (corrupted input_ids, labels), both (B, T).

    Each maskable token is selected with probability `prob`; of the selected, 80% become mask_token_id,
    10% a random token of [0, vocab_size), 10% stay as they are. labels hold the original id at the
    selected positions and -100 elsewhere. Rows must be right-padded; row i's draws come from its own
    generator seeded by seeds[i] (default: i) over its own length, so they do not depend on the batch
    it sits in (micro-batches, ranks) or on its padding.
    """
    B, T = input_ids.shape
    lengths = maskable.long().cumsum(1).argmax(1) + 1  # up to the last maskable position
    u = torch.ones(B, T, 3)
    rand = torch.zeros(B, T, dtype=torch.long)
    for i in range(B):
        g = torch.Generator().manual_seed(int(seeds[i]) if seeds is not None else i)
        L = int(lengths[i])
        u[i, :L] = torch.rand(L, 3, generator=g)
        rand[i, :L] = torch.randint(vocab_size, (L,), generator=g)
    u, rand = u.to(input_ids.device), rand.to(input_ids.device)
    selected = (u[..., 0] < prob) & maskable.bool()
    replaced = selected & (u[..., 1] < 0.8)
    randomised = selected & ~replaced & (u[..., 2] < 0.5)
    ids = torch.where(replaced, torch.full_like(input_ids, mask_token_id), input_ids)
    ids = torch.where(randomised, rand, ids)
    return ids, torch.where(selected, input_ids, torch.full_like(input_ids, -100))


def mntp_loss(hidden, labels, lm_head_weight, reduction="mean"):
    """Masked next-token prediction (llm2vec): token i is predicted from the output at position i-1
    through the (frozen) LM head; cross-entropy at the selected positions only. hidden (B, T, C),
    labels (B, T) with -100 where nothing is predicted. Logits are formed for the selected positions
    only (a 128k vocabulary x every position would dominate memory). reduction "sum" for exact
    accumulation over micro-batches."""
    h, y = hidden[:, :-1], labels[:, 1:]  # output i-1 predicts token i
    sel = y != -100
    logits = F.linear(h[sel].to(lm_head_weight.dtype), lm_head_weight).float()  # (N, V); no fp32 copy of the head
    return F.cross_entropy(logits, y[sel], reduction=reduction)


def load_lm_head(name_or_path, model):
    """The LM head weight (V, C) of a causal-LM checkpoint, detached (MNTP uses it, never trains it).
    AutoModel drops `lm_head.weight`: read it from the checkpoint's safetensors, or take the input
    embeddings when the config ties them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    emb = base.get_input_embeddings().weight
    if getattr(cfg, "tie_word_embeddings", False):
        return emb.detach()
    from safetensors import safe_open
    from transformers.utils import cached_file
    kw = dict(_raise_exceptions_for_missing_entries=False)
    index = cached_file(name_or_path, "model.safetensors.index.json", **kw)
    if index:
        with open(index) as f:
            shard = json.load(f)["weight_map"].get("lm_head.weight")
        file = cached_file(name_or_path, shard, **kw) if shard else None
    else:
        file = cached_file(name_or_path, "model.safetensors", **kw)
    if file:
        with safe_open(file, framework="pt") as f:
            if "lm_head.weight" in f.keys():
                return f.get_tensor("lm_head.weight").to(device=emb.device, dtype=emb.dtype)
    raise ValueError(f"{name_or_path}: no lm_head.weight in its safetensors and untied embeddings; "
                     "MNTP needs the LM head of a causal-LM checkpoint")


def mntp_accumulate(encoder, chunks, lm_head_weight, num_selected, scale=1.0, autocast=None):
    """One MNTP step over micro-batches: backward of sum-over-chunks CE / num_selected (the selected
    tokens of the whole global batch), times `scale` (world size under gradient averaging). The loss
    is a plain sum over tokens, so accumulating micro-batch gradients is exact: unlike the contrastive
    objectives it needs no gradient caching. chunks: dicts with input_ids, attention_mask, labels.
    Returns the loss (detached)."""
    total = 0.0
    for c in chunks:
        with autocast or contextlib.nullcontext():
            hidden = encoder.hidden_states(c["input_ids"], c["attention_mask"])
        loss = mntp_loss(hidden, c["labels"], lm_head_weight, reduction="sum") * (scale / max(num_selected, 1))
        loss.backward()
        total += loss.detach()
    return total


# -----------------------------------------------------------------------------
# Vision tower (timm)

class VisionTower(nn.Module):
    """A timm image model -> (B, output_dim) features, with its own preprocessing in `data_config`.

    embed_dim: None keeps the model's own head (e.g. the pretrained CLIP projection of timm's
    `*_clip_*.openai` models); an int > 0 puts a new head of that size in timm's own head slot (so the
    trained tower reloads with `timm.create_model(name, num_classes=embed_dim)`); 0 means no head.
    weights: an optional local file (state dict, .pt/.pth/.bin or .safetensors) loaded instead of hub weights.
    timm_kwargs / keyword arguments: passed to `timm.create_model` (e.g. img_size, depth; the ViT width
    `embed_dim` only via the timm_kwargs dict). `self.timm_kwargs` is what re-creates the same model.
    """

    def __init__(self, model_name, pretrained=False, weights=None, embed_dim=None, gradient_checkpointing=False,
                 timm_kwargs=None, **more_timm_kwargs):
        super().__init__()
        import timm
        self.model_name = model_name
        # timm's own `embed_dim` (the ViT width) clashes with ours, so it can only come in timm_kwargs
        self.timm_kwargs = {**(timm_kwargs or {}), **more_timm_kwargs}
        if embed_dim is not None:
            self.timm_kwargs["num_classes"] = embed_dim
        self.model = timm.create_model(model_name, pretrained=pretrained and weights is None, **self.timm_kwargs)
        if weights:
            self._load_weights(weights)
        self.output_dim = self.model.num_classes or self.model.num_features
        self.data_config = timm.data.resolve_data_config({}, model=self.model)
        img_size = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        if img_size is not None:  # an img_size override is not in the pretrained cfg timm resolves from
            self.data_config["input_size"] = (3, *tuple(img_size))
        self.set_grad_checkpointing(gradient_checkpointing)

    def _load_weights(self, path):
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        own = self.model.state_dict()
        # a new head (embed_dim differs from the file's) keeps its fresh init; anything else must match
        head = {k for k in sd if k in own and sd[k].shape != own[k].shape and k.startswith(("head", "fc.", "classifier"))}
        sd = {k: v for k, v in sd.items() if k not in head}
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith(("head", "fc.", "classifier"))]
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match timm model {self.model_name!r}: "
                             f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}")

    def set_grad_checkpointing(self, enable=True):
        self.model.set_grad_checkpointing(enable)

    def forward(self, images):  # (B, 3, H, W) -> (B, output_dim)
        return self.model(images)


# -----------------------------------------------------------------------------
# FLOPs estimates (forward, per item): 2 per matmul weight per token + attention's two T x T products.
# Training costs ~3x forward. Used for MFU in post_train.py and for the ratios in bench.py.

def matmul_params(module):
    """Weights that multiply every token (Linear and Conv2d), i.e. what costs 2 FLOPs per token."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def vit_flops(vit):
    """Forward FLOPs per image of a timm VisionTransformer (the head runs on one pooled token)."""
    T = vit.patch_embed.num_patches + vit.num_prefix_tokens
    per_token = matmul_params(vit.blocks) + matmul_params(vit.patch_embed)
    return 2 * per_token * T + 4 * len(vit.blocks) * T * T * vit.embed_dim + 2 * matmul_params(vit.head)


def llm_flops(llm, T, params=None):
    """Forward FLOPs per text of T tokens of a HF decoder without LM head (params: precomputed matmul_params)."""
    c = llm.config
    return 2 * (params or matmul_params(llm)) * T + 4 * c.num_hidden_layers * T * T * c.hidden_size


# -----------------------------------------------------------------------------
# The CLIP-style model trained in stage 2

# Stage-2 losses (the paper's Table 10): CLIP losses between the image and each text side, summed.
# "llm": the LLM through the adaptor; "clip_t": CLIP's own text tower; "cat": CatHead(llm, clip_t).
LOSS_TERMS = {
    "a": (("llm", "image"),),  # the paper's default: the LLM replaces CLIP's text tower
    "direct": (("clip_t", "image"),),  # plain CLIP fine-tuning on the same data (baseline rows)
    "b": (("llm", "image"), ("clip_t", "image")),
    "c": (("llm", "image"), ("clip_t", "image"), ("clip_t", "llm")),
    "d": (("cat", "image"),),
}


def multi_clip_loss(features, terms, logit_scale):
    """Sum of `clip_loss(features[a], features[b], logit_scale)` over terms (pairs of feature names).
    Each term gathers its features across ranks like clip_loss, so the sum stays exact under DDP."""
    return sum(clip_loss(features[a], features[b], logit_scale) for a, b in terms)


class LLM2CLIP(nn.Module):
    """Vision tower + text side(s) + learnable log logit scale; `losses` (LOSS_TERMS) picks the text sides.

    LLM side: `adaptor` ("linear": the MLP Adaptor over a pooled LLM embedding, cached or online;
    "transformer": TransformerAdaptor over the LLM's token states). With `text_encoder` (the LLM with
    trainable LoRA) the LLM runs inside forward. CLIP-T side: `clip_text` (a CLIPText). forward(images,
    text) takes the text as a tensor (the LLM embedding) or a dict with keys "llm" (embedding (B, C) or
    token states (B, T, C)), "llm_mask", "llm_ids"/"llm_attention_mask"/"llm_embed_mask" (tokens for
    `text_encoder`), "clip_ids"/"clip_mask"; it returns (image, *features of text_names, logit scale)
    and `loss(outputs)` is the variant's summed CLIP loss. Every batch-sized input splits along dim 0.
    """

    def __init__(self, vision, text_dim, adaptor_blocks=4, adaptor_expansion=2, logit_scale_init=math.log(1 / 0.07),
                 losses="a", clip_text=None, adaptor="linear", text_encoder=None):
        super().__init__()
        if losses not in LOSS_TERMS:
            raise ValueError(f"losses={losses!r}; expected one of {', '.join(LOSS_TERMS)}")
        self.losses, self.terms = losses, LOSS_TERMS[losses]
        self.text_names = tuple(dict.fromkeys(n for t in self.terms for n in t if n != "image"))
        D = vision.output_dim
        uses_llm, uses_clip = losses != "direct", losses != "a"
        if uses_clip != (clip_text is not None):
            raise ValueError(f"losses={losses!r} " + ("needs clip_text (CLIP's own text tower)" if uses_clip
                                                      else "does not use clip_text; set losses to direct, b, c or d"))
        if uses_clip and losses != "d" and clip_text.dim != D:
            raise ValueError(f"clip_text projects to {clip_text.dim}-d but the vision tower outputs {D}-d: CL(CLIP-T, "
                             "CLIP-V) needs one space (keep the pretrained CLIP head: embed_dim=-1), or use losses=d")
        self.vision, self.clip_text = vision, clip_text
        self.adaptor = build_adaptor(adaptor, text_dim, D, adaptor_blocks, adaptor_expansion) if uses_llm else None
        self.text_encoder = text_encoder if uses_llm else None  # LoRA online: trained with the adaptor
        self.cat_head = CatHead(D, clip_text.dim, D) if losses == "d" else None
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))  # stored as a log, like CLIP

    def encode_image(self, images):
        return F.normalize(self.vision(images).float(), dim=-1)

    def encode_text(self, text_embeddings):
        """The LLM side from an embedding (or a dict of LLM inputs) -> L2-normalised (B, D)."""
        text = text_embeddings if isinstance(text_embeddings, dict) else {"llm": text_embeddings}
        return F.normalize(self._llm(text), dim=-1)

    def _llm(self, text):
        if self.text_encoder is not None and "llm_ids" in text:  # the LLM itself (LoRA) runs here
            out = self.text_encoder(text["llm_ids"], text["llm_attention_mask"], text.get("llm_embed_mask"),
                                    pool=not getattr(self.adaptor, "takes_tokens", False))
            text = {"llm": out} if torch.is_tensor(out) else {"llm": out[0], "llm_mask": out[1]}
        if getattr(self.adaptor, "takes_tokens", False):
            if text["llm"].dim() != 3:
                raise ValueError("the transformer adaptor needs the LLM's token states (B, T, C), not pooled embeddings")
            return self.adaptor(text["llm"], text["llm_mask"])
        return self.adaptor(text["llm"])

    def text_features(self, text):
        """L2-normalised features of every text side in text_names -> {name: (B, D)}."""
        feats = {}
        raw_llm = self._llm(text) if self.adaptor is not None else None
        raw_clip = self.clip_text(text["clip_ids"], text.get("clip_mask")) if self.clip_text is not None else None
        if "llm" in self.text_names:
            feats["llm"] = F.normalize(raw_llm, dim=-1)
        if "clip_t" in self.text_names:
            feats["clip_t"] = F.normalize(raw_clip.float(), dim=-1)
        if "cat" in self.text_names:
            feats["cat"] = F.normalize(self.cat_head(raw_llm, raw_clip), dim=-1)
        return feats

    def forward(self, images, text):
        text = text if isinstance(text, dict) else {"llm": text}
        feats = self.text_features(text)
        return (self.encode_image(images), *(feats[n] for n in self.text_names), self.logit_scale.exp())

    def loss(self, outputs):
        """The variant's loss from forward's outputs (or the same tensors gathered over chunks)."""
        feats = dict(zip(("image",) + self.text_names, outputs[:-1]))
        return multi_clip_loss(feats, self.terms, outputs[-1])


def text_inputs(model, texts, embeddings=None, frozen_llm=None, instruction=None, max_length=512, device=None):
    """An LLM2CLIP's text input for a batch of captions, as the variant needs it:
    "llm": the cached embeddings (B, C), or the frozen LLM's pooled embedding or token states (B, T, C) +
    "llm_mask" (transformer adaptor); "llm_ids", ...: tokens when the LLM trains (LoRA, model.text_encoder);
    "clip_ids", "clip_mask": CLIP-T tokens (77, truncated). Run it under the step's autocast."""
    text = {}
    if model.adaptor is not None:
        llm = model.text_encoder if model.text_encoder is not None else frozen_llm
        if llm is None:
            text["llm"] = embeddings
        else:
            tok = llm.tokenize(texts, instruction, max_length)
            if model.text_encoder is not None:  # runs inside the model, with gradient
                text.update(llm_ids=tok["input_ids"], llm_attention_mask=tok["attention_mask"],
                            llm_embed_mask=tok["embed_mask"])
            else:
                with torch.no_grad():
                    out = llm(**{k: v.to(llm.device) for k, v in tok.items()},
                              pool=not getattr(model.adaptor, "takes_tokens", False))
                text.update({"llm": out.float()} if torch.is_tensor(out)  # pooled (B, C) | token states + mask
                            else {"llm": out[0].float(), "llm_mask": out[1]})
    if model.clip_text is not None:
        text.update(model.clip_text.tokenize(texts))
    return {k: v.to(device, non_blocking=True) for k, v in text.items()}


def split_batch(text, micro):
    """A batch's text input (a tensor or a dict of tensors, as text_inputs gives) -> chunks of `micro` along dim 0."""
    if torch.is_tensor(text):
        return list(text.split(micro))
    parts = {k: v.split(micro) for k, v in text.items()}
    return [{k: parts[k][j] for k in parts} for j in range(len(next(iter(parts.values()))))]


class ImageEncoder(nn.Module):
    """Inference wrapper: images (B, 3, H, W) -> L2-normalised (B, D); `data_config` is the preprocessing."""

    def __init__(self, vision):
        super().__init__()
        self.vision = vision
        self.data_config = vision.data_config

    def forward(self, images):
        return F.normalize(self.vision(images).float(), dim=-1)


class LLM2CLIPTextEncoder(nn.Module):
    """Inference wrapper: raw strings -> LLM (frozen) -> adaptor -> L2-normalised (N, D)."""

    def __init__(self, text_encoder, adaptor, instruction=None, max_length=512):
        super().__init__()
        self.text_encoder, self.adaptor = text_encoder, adaptor
        self.instruction, self.max_length = instruction, max_length

    @torch.no_grad()
    def encode(self, texts, batch_size=64, show_progress=False):
        if getattr(self.adaptor, "takes_tokens", False):  # the transformer adaptor reads token states
            feats, device = [], self.text_encoder.device
            for s in range(0, len(texts), batch_size):
                tok = self.text_encoder.tokenize(texts[s:s + batch_size], self.instruction, self.max_length)
                hidden, mask = self.text_encoder(**{k: v.to(device) for k, v in tok.items()}, pool=False)
                feats.append(F.normalize(self.adaptor(hidden, mask), dim=-1).cpu())
            return torch.cat(feats)
        emb = self.text_encoder.encode(texts, self.instruction, self.max_length, batch_size, show_progress)
        return self.encode_embeddings(emb)

    @torch.no_grad()
    def encode_embeddings(self, embeddings):
        p = next(self.adaptor.parameters())
        return F.normalize(self.adaptor(embeddings.to(p.device)), dim=-1)


class CatTextEncoder(nn.Module):
    """Inference wrapper of Table 10 (d): CatHead(LLM side, CLIP-T) -> L2-normalised (N, D)."""

    def __init__(self, llm_side, clip_text, cat_head):
        super().__init__()
        self.llm_side, self.clip_text, self.cat_head = llm_side, clip_text, cat_head

    @torch.no_grad()
    def encode(self, texts, batch_size=64, show_progress=False):
        llm = self.llm_side.encode(texts, batch_size, show_progress)  # CatHead normalises both inputs anyway
        clip = self.clip_text.encode(texts, batch_size)
        p = next(self.cat_head.parameters())
        return F.normalize(self.cat_head(llm.to(p.device), clip.to(p.device)), dim=-1)


def _read_json(path):
    """A JSON file whose errors name the file."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from None


def _load_state(path):
    """torch.load(weights_only=True) whose errors (missing, truncated, corrupt file) name the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"{path}: cannot load ({type(e).__name__}: {str(e)[:200]})") from None


def _read_llm2clip(out_dir):
    return _read_json(os.path.join(out_dir, LLM2CLIP_CONFIG))


def load_llm2clip(out_dir, device="cpu", load_text=True, text=None, text_settings=None):
    """Load a post_train.py export -> (ImageEncoder, text encoder or None), ready for inference.

    `llm2clip.json` names the timm model and kwargs, the files of the vision tower and adaptor state
    dicts, and the stage-1 text encoder with the settings its training captions were embedded with
    (bidirectional, pooling, chat_template, instruction, max_length). text_settings: overrides of
    those (a None value keeps the recorded one).
    text: which of the run's text encoders (`text_encoders` in the json: "llm", "clip_t", "cat");
    None = the first. Each has `.encode(texts, batch_size)` -> L2-normalised (N, D).
    """
    meta = _read_llm2clip(out_dir)
    v = meta["vision"]
    vision = VisionTower(v["model_name"], pretrained=False, timm_kwargs=v.get("timm_kwargs", {}))
    vision.model.load_state_dict(_load_state(os.path.join(out_dir, v["file"])))
    image_encoder = ImageEncoder(vision).to(device).eval()
    return image_encoder, (load_llm2clip_text(out_dir, text, device, text_settings=text_settings) if load_text else None)


def load_llm2clip_text(out_dir, text=None, device="cpu", clip_loader=None, text_settings=None):
    """One text encoder of a post_train.py export: "llm" (LLM + adaptor, with the stage-2 LoRA if the run
    trained one), "clip_t" (CLIP's own text tower as fine-tuned) or "cat" (both through the Cat head).
    clip_loader(folder, device) loads the exported CLIP-T (default load_clip_text; an open_clip CLIP-T
    needs evaluate.load_open_clip_text)."""
    meta = _read_llm2clip(out_dir)
    names = meta.get("text_encoders", ["llm"])
    text = text or names[0]
    if text not in names:
        raise ValueError(f"{out_dir}: text encoder {text!r} not in this run's {names}")
    if text in ("llm", "cat"):
        a = meta["adaptor"]
        adaptor = build_adaptor(a.get("kind", "linear"), a["in_dim"], a["out_dim"], a["num_blocks"], a["expansion"])
        adaptor.load_state_dict(_load_state(os.path.join(out_dir, a["file"])))
        t = meta["text"]
        text_path = t["model"] if os.path.isabs(t["model"]) else os.path.join(out_dir, t["model"])
        if not os.path.exists(text_path):
            text_path = t["model"]  # a hub name
        lora = os.path.join(out_dir, t["lora"]) if t.get("lora") else None
        t = {**t, **{k: v for k, v in (text_settings or {}).items() if v is not None}}
        enc = load_text_encoder(text_path, pooling=t.get("pooling"), bidirectional=t.get("bidirectional"),
                                chat_template=t.get("chat_template"), device=device, lora=lora)
        llm_side = LLM2CLIPTextEncoder(enc, adaptor.to(device), t.get("instruction"), t.get("max_length") or 512).eval()
        if text == "llm":
            return llm_side
    clip_dir = os.path.join(out_dir, meta["clip_text"]["dir"])
    if clip_loader is None and os.path.isfile(os.path.join(clip_dir, "open_clip.json")):
        raise ValueError(f"{out_dir}: its CLIP-T is an open_clip model; load it with "
                         "clip_loader=evaluate.load_open_clip_text (pip install open_clip_torch)")
    clip_text = (clip_loader or load_clip_text)(clip_dir, device=device).eval()
    if text == "clip_t":
        return clip_text
    h = meta["cat_head"]
    head = CatHead(h["llm_dim"], h["clip_dim"], h["out_dim"])
    head.load_state_dict(_load_state(os.path.join(out_dir, h["file"])))
    return CatTextEncoder(llm_side, clip_text, head.to(device)).eval()


# -----------------------------------------------------------------------------
# Contrastive losses, correct under DDP

class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # d(sum of all ranks' losses) / d(gathered features)
        b = grad.shape[0] // dist.get_world_size()
        r = dist.get_rank()
        return grad[r * b:(r + 1) * b]


def _dist_on():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x):
    """Concatenate x (B, D) from every rank (same B everywhere) -> (world*B, D), keeping the gradient."""
    return _GatherWithGrad.apply(x) if _dist_on() else x


def _upcast(x):
    """Half-precision features -> float32 for the softmax; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _local_labels(b, device):
    rank = dist.get_rank() if _dist_on() else 0
    return torch.arange(b, device=device) + b * rank


def clip_loss(image_features, text_features, logit_scale):
    """CLIP's symmetric InfoNCE over the global batch; this rank's rows only ("local loss").

    logit_scale is the multiplier (the model stores its log and passes `.exp()`). Features are
    L2-normalised here. Under DDP the mean over ranks of this loss is the full-batch loss, and
    DDP's gradient averaging yields exactly the full-batch gradient.
    """
    img = F.normalize(_upcast(image_features), dim=-1)  # (B, D)
    txt = F.normalize(_upcast(text_features), dim=-1)
    all_img, all_txt = gather_with_grad(img), gather_with_grad(txt)  # (N, D)
    labels = _local_labels(img.shape[0], img.device)
    logits_i2t = logit_scale * img @ all_txt.T  # (B, N)
    logits_t2i = logit_scale * txt @ all_img.T
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


def caption_contrastive_loss(q, d, temperature=0.05, hard_negatives=None):
    """Supervised SimCSE: query i must pick its positive d_i among every positive (and hard negative)
    of the global batch. Cosine similarity / temperature; local rows; labels offset by rank."""
    q = F.normalize(_upcast(q), dim=-1)  # (B, D)
    cands = gather_with_grad(F.normalize(_upcast(d), dim=-1))  # (N, D)
    if hard_negatives is not None:
        cands = torch.cat([cands, gather_with_grad(F.normalize(_upcast(hard_negatives), dim=-1))], 0)
    logits = q @ cands.T / temperature  # (B, N or 2N)
    return F.cross_entropy(logits, _local_labels(q.shape[0], q.device))



# -----------------------------------------------------------------------------
# Gradient caching (GradCache, open_clip's accum-freq): the full-batch contrastive objective in the
# activation memory of one chunk

class _RNGState:
    """The CPU and current CUDA device RNG states before one forward, to replay its dropout masks."""

    def __init__(self):
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.device = torch.cuda.current_device() if cuda else None
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(self.device) if cuda else None

    @contextlib.contextmanager
    def replay(self):
        """Run the block from this state; the outer RNG stream is left as it was."""
        with torch.random.fork_rng(devices=[] if self.device is None else [self.device]):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def grad_cache_step(forward, groups, loss_fn, *, no_sync=None, autocast=None):
    """One contrastive step over a batch given in chunks; returns the loss (detached). Afterwards the
    parameters' .grad hold (are incremented by) the gradient of the whole batch's loss.

    groups: the sides embedded by the same model (stage 1: queries, positives, hard negatives; stage
    2: one side of (images, text embeddings) chunks), each a list of chunks; forward(chunk) -> a
    tensor (n, ...) or a tuple of them. A 0-dim output (the logit scale) is the same for every chunk:
    the loss sees the first chunk's and its gradient is applied once per side. loss_fn(*sides) gets
    each side's outputs concatenated over its chunks (shaped like forward's) and does any cross-rank
    gathering itself. no_sync: e.g. DDP's `model.no_sync`, entered for every re-run but the last, so
    gradients are all-reduced once. autocast: a context for the forwards.

    One chunk per side: plain forward + backward. More: (1) run every chunk without grad, keeping its
    RNG state; (2) the whole batch's loss and its gradient w.r.t. the outputs (the gradient cache);
    (3) re-run each chunk with grad, its RNG state replayed so dropout masks repeat, and back-propagate
    its slice of the cache. Activations of one chunk of one side are alive at a time; the RNG stream
    is left as (1) left it, as if every chunk had run once.
    """
    autocast = autocast or contextlib.nullcontext()
    if all(len(side) == 1 for side in groups):
        with autocast:
            outs = [forward(side[0]) for side in groups]
        loss = loss_fn(*outs)
        loss.backward()
        return loss.detach()
    # (1) outputs without grad; batched ones concatenated (float32 for the loss), 0-dim ones from the first chunk
    states, cache, tuples = [], [], []
    with torch.no_grad():
        for side in groups:
            outs = []
            for chunk in side:
                states.append(_RNGState())
                with autocast:
                    out = forward(chunk)
                outs.append(out if isinstance(out, tuple) else (out,))
            tuples.append(isinstance(out, tuple))
            cache.append([_upcast(torch.cat(o) if o[0].ndim else o[0]).detach().requires_grad_() for o in zip(*outs)])
    # (2) the loss of the whole batch and its gradient w.r.t. every output (the loss's gathers run here)
    loss = loss_fn(*[tuple(c) if t else c[0] for c, t in zip(cache, tuples)])
    flat = [x for c in cache for x in c]
    grads = iter(torch.autograd.grad(loss, flat, allow_unused=True))
    grad_cache = [[next(grads) for _ in c] for c in cache]  # per side, per output
    # (3) re-run each chunk with grad; back-propagate its rows of the cached gradient
    n_left = sum(len(side) for side in groups)
    state = iter(states)
    for side, cached in zip(groups, grad_cache):
        start = 0
        for j, chunk in enumerate(side):
            n_left -= 1
            with (no_sync() if no_sync is not None and n_left else contextlib.nullcontext()):
                with next(state).replay(), autocast:
                    out = forward(chunk)
                out = out if isinstance(out, tuple) else (out,)
                n = next(o.shape[0] for o in out if o.ndim)
                roots, root_grads = [], []
                for o, g in zip(out, cached):
                    if g is not None and (o.ndim or j == len(side) - 1):  # a shared 0-dim output: once
                        roots.append(_upcast(o))
                        root_grads.append(g[start:start + n] if o.ndim else g)
                if roots:
                    torch.autograd.backward(roots, root_grads)
            start += n
    return loss.detach()
