"""LLM2CLIP's model, self-contained (torch, transformers, peft, timm, numpy and the standard library
only) so that it can be copied into another project alone.

1. The LLM caption encoder: a HF text model (decoder LLM or BERT-like encoder) with bidirectional
   attention, mean/eos pooling over the text tokens only (an instruction is attended to, never
   pooled), and LoRA through peft.
2. The adaptor: L2-normalised LLM embedding -> pre-LN residual MLP blocks -> LN -> Linear.
3. The vision tower: a timm model with its own preprocessing config.
4. The CLIP-style model stage 2 trains (vision + adaptor + learnable logit scale), its inference
   wrappers, and the artefact formats (encoder.json, llm2clip.json) with load_llm2clip.
The losses and gradient caching are in loss.py; CLIP's own text towers (Table 10) in zoo.py.
"""
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

# LoRA targets (paper: q,k,v,o,gate,up,down). BERT-likes name the same projections differently.
DECODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ENCODER_LORA_TARGETS = ["query", "key", "value", "dense"]


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

# Chat wrappings of the official code (llm2vec 0.2.3's prepare_for_tokenization and the copy vendored in
# microsoft/LLM2CLIP, which its embedding extraction runs): every caption (and instruction) is put in one
# user turn; the closing token(s) are pooled with the text. Its released Llama-3 stage-1 weights and
# caption embeddings were made with "llama3". gemma2's "<bos>" follows the tokenizer's own BOS, as there.
CHAT_TEMPLATES = {
    "llama3": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),  # Meta-Llama-3-8B-Instruct
    "mistral": ("[INST] ", " [/INST]"),  # Mistral-7B-Instruct-v0.2, Llama-2-7b-chat
    "gemma2": ("<bos><start_of_turn>user\n", "<end_of_turn>"),  # gemma-2-9b-it
    "qwen2": ("<|im_start|>user\n", "<|im_end|>"),  # Qwen2-1.5B/7B-Instruct
    "phi3": ("<|user|>\n", "<|end|>\n"),  # Phi-3.5-mini-instruct (the vendored copy only)
}
# chat_template="auto": the wrapping of the config's model_type, when the tokenizer has its special tokens
# (a "llama" without Llama-3's is Llama-2-chat ("mistral") or a base model ("none"): ambiguous, refused)
CHAT_MODEL_TYPES = {"llama": "llama3", "mistral": "mistral", "gemma2": "gemma2", "qwen2": "qwen2", "phi3": "phi3"}
OFFICIAL_DOC_MAX_LENGTH = 512  # llm2vec's doc_max_length as the official extraction sets it


def _missing_chat_tokens(tokenizer, chat_template):
    """The special tokens (<...>) of a wrapping that are not one token of this tokenizer's vocabulary."""
    toks = re.findall(r"<[^<>\s]+>", "".join(CHAT_TEMPLATES[chat_template]))
    bad = lambda ids: len(ids) != 1 or ids[0] == tokenizer.unk_token_id  # noqa: E731
    return [t for t in toks if bad(tokenizer(t, add_special_tokens=False)["input_ids"])]


def resolve_chat_template(model, tokenizer):
    """chat_template="auto" -> the CHAT_TEMPLATES key the official code uses for this model's family
    (config.model_type), if the tokenizer has that wrapping's special tokens; else a one-line error."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(base.config, "model_type", None)
    key = CHAT_MODEL_TYPES.get(model_type)
    if key is None or _missing_chat_tokens(tokenizer, key):
        raise ValueError(f"chat_template='auto': cannot tell the chat wrapping of model_type={model_type!r} with "
                         f"this tokenizer ({type(tokenizer).__name__}); set chat_template to 'none' or one of "
                         f"{', '.join(CHAT_TEMPLATES)}")
    return key


def _official_doc_cut(tokenizer, text, max_length):
    """llm2vec's _convert_to_str: a text of more than OFFICIAL_DOC_MAX_LENGTH tokens (counted up to
    max_length) loses words from its end in proportion until it fits; a no-op when max_length <= 512."""
    count = lambda t: min(len(tokenizer(t, add_special_tokens=False)["input_ids"]), max_length)  # noqa: E731
    n = count(text) if max_length > OFFICIAL_DOC_MAX_LENGTH else 0
    while n > OFFICIAL_DOC_MAX_LENGTH:
        words = text.split()
        text = " ".join(words[:int(len(words) * OFFICIAL_DOC_MAX_LENGTH / n)])
        n = count(text)
    return text


class TextEncoder(nn.Module):
    """A HF text model as a caption encoder: forward(input_ids, attention_mask, embed_mask) -> (B, C).

    Sequences are laid out as [tokenizer prefix] [chat head] [instruction] [text] [chat tail]
    [tokenizer suffix]; the pooled span (`embed_mask`) is the text, the chat tail (e.g. <|eot_id|>) and
    the suffix (e.g. EOS), and for BERT-like encoders also the prefix ([CLS]), which is what
    sentence-transformers' mean pooling does. A decoder's BOS is never pooled (its state is an
    attention sink with an outsized norm). The instruction is never pooled. With an instruction the
    tokens are those of the joined string `instruction + " " + text` (as llm2vec tokenises it), so a
    byte-level BPE text keeps its first word's leading-space token; the text span is found by offsets.
    chat_template: "" (none), "auto" (resolve_chat_template) or a key of CHAT_TEMPLATES.

    official_extraction=True lays texts out as the official embedding extraction (llm2vec's encode) does,
    to reproduce its released rows: with a chat wrapping the text loses its trailing whitespace, the
    wrapped sequence is cut at max_length from the right (the closing token goes first), and the last n
    positions are pooled, n = the tokens of "text + chat tail" tokenised alone (mean pooling only).
    """

    def __init__(self, model, tokenizer, pooling="mean", settings=None, chat_template="", official_extraction=False):
        super().__init__()
        if pooling not in POOLERS:
            raise ValueError(f"pooling={pooling!r}; expected one of {sorted(POOLERS)}")
        if chat_template == "auto":
            chat_template = resolve_chat_template(model, tokenizer)
        if chat_template and chat_template not in CHAT_TEMPLATES:
            raise ValueError(f"chat_template={chat_template!r}; expected '', 'auto' or one of {sorted(CHAT_TEMPLATES)}")
        if official_extraction and pooling != "mean":
            raise ValueError(f"official_extraction=True with pooling={pooling!r}: the official extraction pools "
                             "the mean; use pooling='mean' or official_extraction=False")
        self.model, self.tokenizer, self.pooling = model, tokenizer, pooling
        self.chat_template, self.official_extraction = chat_template or "", bool(official_extraction)
        self.settings = dict(settings or {})
        self.is_decoder = is_decoder_model(model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.prefix, self.suffix = _special_affixes(tokenizer)
        if pooling == "eos" and self.is_decoder and tokenizer.eos_token_id is not None \
                and self.suffix[-1:] != [tokenizer.eos_token_id]:
            self.suffix = self.suffix + [tokenizer.eos_token_id]  # eos pooling needs an EOS to pool
        self.pool_prefix = not self.is_decoder
        self.chat = CHAT_TEMPLATES[self.chat_template] if self.chat_template else ("", "")
        missing = _missing_chat_tokens(tokenizer, self.chat_template) if self.chat_template else []
        if missing:  # each special token of the wrapping must be one token of this vocabulary
            raise ValueError(f"chat_template={chat_template!r}: {missing[0]} is not a special token of this tokenizer "
                             f"({type(tokenizer).__name__}); use it with a tokenizer of that model family")
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
        return self._pack(self.split_tokens(texts, instruction, max_length), max_length, texts, range(len(texts)))

    def split_tokens(self, texts, instruction=None, max_length=512):
        """Per text, (head ids, text ids, tail ids) without the tokenizer's special affixes: head = chat
        head + instruction (not pooled), tail = chat tail (pooled). Without either, the text alone."""
        if self.official_extraction:
            return self._official_split(texts, instruction, max_length)
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

    def _official_split(self, texts, instruction, max_length):
        """(head, body, []) per text as llm2vec's encode lays it out (_convert_to_str, prepare_for_tokenization,
        tokenize): head + body = the tokens of the wrapped string, body its last n, n = the tokens of
        "text + chat tail" tokenised alone, which is what it pools (none for an empty text)."""
        head, tail = self.chat
        pre = instruction.strip() + " " if instruction else ""
        texts = [_official_doc_cut(self.tokenizer, x, max_length) for x in texts]
        if self.chat_template:  # the wrapping strips "instruction !@#$%^&*()text": the text's trailing whitespace
            pre, texts = pre.lstrip(), [x.rstrip() for x in texts]
        full = self.tokenizer([head + pre + x + tail for x in texts], add_special_tokens=False)["input_ids"]
        alone = self.tokenizer([x + tail for x in texts], add_special_tokens=False)["input_ids"]
        cut = [len(ids) - min(len(n), len(ids)) if x else len(ids) for ids, n, x in zip(full, alone, texts)]
        return [(ids[:c], ids[c:], []) for ids, c in zip(full, cut)]

    def lengths(self, texts, instruction=None, max_length=512):
        """Tokens per text exactly as `tokenize` lays them out (special tokens, instruction, truncation)."""
        fixed = len(self.prefix) + len(self.suffix)
        return [min(len(h) + len(b) + len(t) + fixed, max_length)
                for h, b, t in self.split_tokens(texts, instruction, max_length)]

    def _pack(self, parts, max_length, texts, index):
        """Lay out already-split texts (parts[k] = (head, body, tail) of texts[index[k]]) as a right-padded batch."""
        seqs, pools = [], []
        for (head, body, tail), i in zip(parts, index):
            if not body:
                raise ValueError(f"text {i} is empty ({texts[i]!r}); every caption needs at least one token")
            official = self.official_extraction  # the whole wrapped sequence is cut, not the text alone
            keep = head + body + tail if official else body
            budget = max_length - len(self.prefix) - len(self.suffix) - (0 if official else len(head) + len(tail))
            if budget < 1:
                raise ValueError(f"max_length={max_length} leaves no room for text after the instruction, "
                                 f"chat template and special tokens")
            t = self.truncation
            t["texts"] += 1
            if len(keep) > budget:
                t["truncated"] += 1
                t["tokens_cut"] += len(keep) - budget
                t["max_cut"] = max(t["max_cut"], len(keep) - budget)
                keep = keep[:budget]
            if official:  # the last n positions, n = len(body) (capped): its closing token may be cut
                seqs.append(self.prefix + keep + self.suffix)
                n = min(len(body), len(seqs[-1]))
                pools.append([0] * (len(seqs[-1]) - n) + [1] * n)
                continue
            seqs.append(self.prefix + head + keep + tail + self.suffix)
            pools.append([int(self.pool_prefix)] * len(self.prefix) + [0] * len(head)
                         + [1] * (len(keep) + len(tail) + len(self.suffix)))
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
    def encode(self, texts, instruction=None, max_length=512, batch_size=64, progress=None):
        """Embed raw strings -> (N, C) float32 on CPU, in input order. Batches are length-sorted.
        progress: a wrapper of the batch iterable that shows progress (e.g. tqdm), or None."""
        texts = list(texts)
        parts = self.split_tokens(texts, instruction, max_length)  # tokenised once
        order = sorted(range(len(texts)), key=lambda i: -len(parts[i][1]))
        out = torch.empty((len(texts), self.dim), dtype=torch.float32)
        was_training = self.training
        self.eval()
        starts = range(0, len(texts), batch_size)
        if progress is not None:
            starts = progress(starts)
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


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype):
    """None, a torch dtype or one of DTYPES' names -> torch dtype (None stays None): the one place a
    `dtype` setting is parsed."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[str(dtype)]


def load_text_encoder(name_or_path, *, bidirectional=None, pooling=None, lora=None, dtype=None,
                      attn_implementation=None, device=None, chat_template=None, official_extraction=None):
    """Load a HF model (local folder or hub name) or a cc_finetune.py out_dir as a `TextEncoder`.

    - a stage-1 out_dir (has `encoder.json`): its merged model and the bidirectional, pooling and
      chat_template settings it was trained with are used unless overridden here; `encoder.settings`
      also holds its instruction and max_length.
    - bidirectional (None = the out_dir's, else True): applied to decoders (verified); BERT-likes
      already are. False keeps a decoder causal (to score a raw LLM as it was trained).
    - pooling (None = the out_dir's, else "mean"); chat_template (None = the out_dir's, else none;
      "" or "none" = none; "auto" = the model family's (resolve_chat_template); a key of CHAT_TEMPLATES,
      e.g. "llama3"); official_extraction (None = the out_dir's, else False): see TextEncoder.
    - lora: None, a dict of `attach_lora` kwargs (fresh trainable adapters), or a saved adapter folder.
    - dtype: torch dtype or "bfloat16"/"float32"; attn_implementation: "eager", "sdpa", "flash_attention_2".
    - a stage-1 adaptor named in encoder.json (`cc_adaptor_blocks`) is loaded and applied by forward/encode.
    """
    from transformers import AutoModel, AutoTokenizer
    settings = {}
    path = name_or_path
    if os.path.isfile(os.path.join(name_or_path, ENCODER_CONFIG)):
        settings = read_encoder_config(name_or_path)
        path = os.path.join(name_or_path, settings.get("model_subdir", "merged"))
    bidirectional = settings.get("bidirectional", True) if bidirectional is None else bidirectional
    pooling = settings.get("pooling", "mean") if pooling is None else pooling
    chat_template = settings.get("chat_template") or "" if chat_template is None else chat_template
    chat_template = "" if chat_template == "none" else chat_template
    official_extraction = bool(settings.get("official_extraction", False) if official_extraction is None
                               else official_extraction)
    kwargs = {"dtype": resolve_dtype(dtype)} if dtype is not None else {}
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
    settings.update({"name_or_path": name_or_path, "pooling": pooling, "official_extraction": official_extraction,
                     "bidirectional": bool(bidirectional and decoder), "decoder": decoder})
    encoder = TextEncoder(model, tokenizer, pooling=pooling, settings=settings, chat_template=chat_template,
                          official_extraction=official_extraction)
    encoder.settings["chat_template"] = encoder.chat_template  # "auto" resolved
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


class CatHead(nn.Module):
    """Table 10 (d): Linear over the concatenated L2-normalised LLM-side and CLIP-T features -> joint space."""

    def __init__(self, llm_dim, clip_dim, out_dim):
        super().__init__()
        self.llm_dim, self.clip_dim, self.out_dim = llm_dim, clip_dim, out_dim
        self.proj = nn.Linear(llm_dim + clip_dim, out_dim)

    def forward(self, llm, clip):  # (B, llm_dim), (B, clip_dim) -> (B, out_dim)
        return self.proj(torch.cat([F.normalize(llm.float(), dim=-1), F.normalize(clip.float(), dim=-1)], -1))


CC_ADAPTOR_FILE = "cc_adaptor.pt"  # a stage-1 adaptor's state dict (cc_adaptor_blocks), next to encoder.json


def load_adaptor(out_dir, meta):
    """The stage-1 Adaptor that encoder.json's `adaptor` entry (file, in_dim, out_dim, num_blocks, expansion) names."""
    adaptor = Adaptor(meta["in_dim"], meta["out_dim"], meta["num_blocks"], meta["expansion"])
    adaptor.load_state_dict(_load_state(os.path.join(out_dir, meta["file"])))
    return adaptor


# -----------------------------------------------------------------------------
# Vision tower (timm)

class VisionTower(nn.Module):
    """A timm image model -> (B, output_dim) features, with its own preprocessing in `data_config`.

    embed_dim: None keeps the model's own head (e.g. the pretrained CLIP projection of timm's
    `*_clip_*.openai` models); an int > 0 puts a new head of that size in timm's own head slot (so the
    trained tower reloads with `timm.create_model(name, num_classes=embed_dim)`); 0 means no head.
    weights: an optional local file (state dict, .pt/.pth/.bin or .safetensors) loaded instead of hub weights;
    an open_clip checkpoint of a timm tower (`visual.trunk.*`) loads too, its logits kept in checkpoint_logits.
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
        self.checkpoint_logits = {}  # an open_clip checkpoint's own logit_scale (a log) / logit_bias, if loaded
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
            import timm.models
            sd = timm.models.load_state_dict(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        if any(k.startswith("visual.trunk.") for k in sd):  # open_clip's file of a timm tower (e.g. SigLIP's)
            self.checkpoint_logits = {k: float(sd[k]) for k in ("logit_scale", "logit_bias") if k in sd}
            sd = {k[len("visual.trunk."):]: v for k, v in sd.items() if k.startswith("visual.trunk.")}
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
# The CLIP-style model trained in stage 2

class LLM2CLIP(nn.Module):
    """Vision tower + text side(s) + learnable log logit scale: the model stage 2 trains.

    text_sides (loss.text_sides of the paper's Table 10 variants): "llm" (the LLM through `adaptor`:
    "linear" over a pooled embedding, "transformer" over token states), "clip_t" (CLIP's own text tower
    `clip_text`, a zoo.CLIPText), "cat" (CatHead over both); `text_encoder`: the LLM with trainable LoRA,
    run inside forward. forward(images, text): text is the LLM embedding or a dict ("llm", "llm_mask",
    "llm_ids"/"llm_attention_mask"/"llm_embed_mask", "clip_ids"/"clip_mask"; all split along dim 0) ->
    {"image": (B, D), <each side>: (B, D), "logit_scale": the multiplier[, "logit_bias"]}. logit_bias_init:
    None (CLIP's softmax loss has no bias) or the start of SigLIP's learnable logit bias (its paper: -10).
    """

    def __init__(self, vision, text_dim, adaptor_blocks=4, adaptor_expansion=2, logit_scale_init=math.log(1 / 0.07),
                 text_sides=("llm",), clip_text=None, adaptor="linear", text_encoder=None, logit_bias_init=None):
        super().__init__()
        text_sides = tuple(text_sides)
        if not text_sides or set(text_sides) - {"llm", "clip_t", "cat"}:
            raise ValueError(f"text_sides={text_sides!r}; expected a non-empty tuple of 'llm', 'clip_t', 'cat'")
        self.text_names = text_sides
        D = vision.output_dim
        uses_llm, uses_clip = bool({"llm", "cat"} & set(text_sides)), bool({"clip_t", "cat"} & set(text_sides))
        if uses_clip != (clip_text is not None):
            raise ValueError(f"text sides {text_sides} " + ("need clip_text (CLIP's own text tower)" if uses_clip
                                                            else "do not use clip_text"))
        if "clip_t" in text_sides and clip_text.dim != D:
            raise ValueError(f"clip_text projects to {clip_text.dim}-d but the vision tower outputs {D}-d: CL(CLIP-T, "
                             "CLIP-V) needs one space (keep the pretrained CLIP head: embed_dim=-1), or use losses=d")
        self.vision, self.clip_text = vision, clip_text
        self.adaptor = build_adaptor(adaptor, text_dim, D, adaptor_blocks, adaptor_expansion) if uses_llm else None
        self.text_encoder = text_encoder if uses_llm else None  # LoRA online: trained with the adaptor
        self.cat_head = CatHead(D, clip_text.dim, D) if "cat" in text_sides else None
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))  # stored as a log, like CLIP
        self.logit_bias = None if logit_bias_init is None else nn.Parameter(torch.tensor(float(logit_bias_init)))

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
        out = {"image": self.encode_image(images), **self.text_features(text), "logit_scale": self.logit_scale.exp()}
        return out if self.logit_bias is None else {**out, "logit_bias": self.logit_bias}


class ImageEncoder(nn.Module):
    """Inference wrapper: images (B, 3, H, W) -> L2-normalised (B, D); `data_config` is the preprocessing,
    `logit_scale` the trained multiplier of image-text cosine similarities (None if not recorded), `logit_bias`
    the trained bias of a sigmoid-loss run (None otherwise): sigmoid(scale * cos + bias) is a pair's match probability."""

    def __init__(self, vision, logit_scale=None, logit_bias=None):
        super().__init__()
        self.vision = vision
        self.data_config = vision.data_config
        self.logit_scale, self.logit_bias = logit_scale, logit_bias

    def forward(self, images):
        return F.normalize(self.vision(images).float(), dim=-1)


class LLM2CLIPTextEncoder(nn.Module):
    """Inference wrapper: raw strings -> LLM (frozen) -> adaptor -> L2-normalised (N, D)."""

    def __init__(self, text_encoder, adaptor, instruction=None, max_length=512):
        super().__init__()
        self.text_encoder, self.adaptor = text_encoder, adaptor
        self.instruction, self.max_length = instruction, max_length

    @torch.no_grad()
    def encode(self, texts, batch_size=64, progress=None):
        if getattr(self.adaptor, "takes_tokens", False):  # the transformer adaptor reads token states
            feats, device = [], self.text_encoder.device
            for s in range(0, len(texts), batch_size):
                tok = self.text_encoder.tokenize(texts[s:s + batch_size], self.instruction, self.max_length)
                hidden, mask = self.text_encoder(**{k: v.to(device) for k, v in tok.items()}, pool=False)
                feats.append(F.normalize(self.adaptor(hidden, mask), dim=-1).cpu())
            return torch.cat(feats)
        emb = self.text_encoder.encode(texts, self.instruction, self.max_length, batch_size, progress)
        return self.encode_embeddings(emb)

    @torch.no_grad()
    def encode_embeddings(self, embeddings):
        p = next(self.adaptor.parameters())
        return F.normalize(self.adaptor(embeddings.to(p.device)), dim=-1)


# -----------------------------------------------------------------------------
# Artefact formats: each writer beside its reader. `format_version` is absent from files written
# before it existed (read as version 1); a newer version than this code knows is refused.

ENCODER_CONFIG = "encoder.json"  # a cc_finetune.py out_dir: how to load and use its encoder
LLM2CLIP_CONFIG = "llm2clip.json"  # a post_train.py export: vision tower, adaptor, text side(s)
FORMAT_VERSION = 1


def _write_json(path, obj):
    """JSON written to a temp file and renamed, so a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"format_version": FORMAT_VERSION, **obj}, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _read_json(path):
    """A format file; errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e}); expected a file this code wrote") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is newer than this code reads ({FORMAT_VERSION}); "
                         "update the code")
    return meta


def write_encoder_config(out_dir, meta):
    """encoder.json of a stage-1 out_dir: model_subdir, bidirectional, pooling, chat_template, instruction,
    max_length, the optional stage-1 `adaptor` entry, and the run's provenance."""
    _write_json(os.path.join(out_dir, ENCODER_CONFIG), meta)


def read_encoder_config(out_dir):
    """encoder.json of a cc_finetune.py out_dir; a clear error if `out_dir` is not one."""
    path = os.path.join(out_dir, ENCODER_CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"{out_dir}: no {ENCODER_CONFIG}; expected a cc_finetune.py out_dir")
    return _read_json(path)


def write_llm2clip_config(out_dir, meta):
    """llm2clip.json of a stage-2 export: `vision` (timm name, kwargs, file), `text_encoders`, `adaptor`,
    `text` (stage-1 model and how captions are embedded), `clip_text`, `cat_head`, `logit_scale`, and with the
    sigmoid loss `contrastive_loss` and `logit_bias` (a file without them is a softmax run's, as before)."""
    _write_json(os.path.join(out_dir, LLM2CLIP_CONFIG), meta)


def read_llm2clip_config(out_dir):
    path = os.path.join(out_dir, LLM2CLIP_CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"{out_dir}: no {LLM2CLIP_CONFIG}; expected a post_train.py out_dir")
    return _read_json(path)


def _load_state(path):
    """torch.load(weights_only=True) whose errors (missing, truncated, corrupt file) name the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot load ({type(e).__name__}: {str(e)[:200]}); "
                         "expected a torch.save state dict") from None


def load_llm2clip(out_dir, device="cpu", load_text=True, text=None, text_settings=None):
    """Load a post_train.py export -> (ImageEncoder, text encoder or None), ready for inference.

    The text encoder (`.encode(texts, batch_size)` -> L2-normalised (N, D)) embeds captions with the
    settings recorded in llm2clip.json; text_settings overrides them (a None value keeps the record).
    text: "llm" (None: the run's first side); sides with CLIP's own text tower: zoo.load_llm2clip_text.
    """
    meta = read_llm2clip_config(out_dir)
    v = meta["vision"]
    vision = VisionTower(v["model_name"], pretrained=False, timm_kwargs=v.get("timm_kwargs", {}))
    vision.model.load_state_dict(_load_state(os.path.join(out_dir, v["file"])))
    image_encoder = ImageEncoder(vision, meta.get("logit_scale"), meta.get("logit_bias")).to(device).eval()
    if not load_text:
        return image_encoder, None
    text = text or meta.get("text_encoders", ["llm"])[0]
    if text != "llm":
        raise ValueError(f"{out_dir}: text encoder {text!r} includes CLIP's own text tower; load it with "
                         "zoo.load_llm2clip_text")
    return image_encoder, load_llm_side(out_dir, meta, device, text_settings)


def load_llm_side(out_dir, meta, device="cpu", text_settings=None):
    """The LLM side of an export: the stage-1 encoder (with the stage-2 LoRA if the run trained one) and
    the adaptor -> LLM2CLIPTextEncoder."""
    if "adaptor" not in meta:
        raise ValueError(f"{out_dir}: this run trained no LLM side (losses='direct'); its text side is 'clip_t'")
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
                            chat_template=t.get("chat_template"), official_extraction=t.get("official_extraction"),
                            device=device, lora=lora)
    return LLM2CLIPTextEncoder(enc, adaptor.to(device), t.get("instruction"), t.get("max_length") or 512).eval()
