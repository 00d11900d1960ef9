"""LLM2CLIP's losses: what one edits for a loss ablation. The training loops call them by name.

- clip_loss: CLIP's symmetric InfoNCE over the global batch, correct under DDP (features gathered with
  gradient, this rank's rows, labels offset by rank); multi_clip_loss sums it over the pairs of sides
  that LOSS_TERMS names for each of the paper's Table 10 variants (stage 2). siglip_loss: SigLIP's
  pairwise sigmoid loss with a learnable bias, the same way gathered (post_train's contrastive_loss="sigmoid").
- caption_contrastive_loss: supervised SimCSE between captions of one image (stage 1).
- MNTP: llm2vec's masked next-token prediction (stage 1's `objective="mntp"`).
- grad_cache_step: a contrastive step over a batch larger than one forward pass, with the whole
  batch's negatives and gradient (both stages use it).
"""
import contextlib
import json

import torch
import torch.distributed as dist
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Stage-2 objectives (the paper's Table 10): CLIP losses between the image and each text side, summed.
# "llm": the LLM through the adaptor; "clip_t": CLIP's own text tower; "cat": the Cat head over both.
LOSS_TERMS = {
    "a": (("llm", "image"),),  # the paper's default: the LLM replaces CLIP's text tower
    "direct": (("clip_t", "image"),),  # plain CLIP fine-tuning on the same data (baseline rows)
    "b": (("llm", "image"), ("clip_t", "image")),
    "c": (("llm", "image"), ("clip_t", "image"), ("clip_t", "llm")),
    "d": (("cat", "image"),),
}


def text_sides(losses):
    """The text sides (model.LLM2CLIP's `text_sides`) a LOSS_TERMS variant trains, in order of first use."""
    if losses not in LOSS_TERMS:
        raise ValueError(f"losses={losses!r}; expected one of {', '.join(LOSS_TERMS)}")
    return tuple(dict.fromkeys(n for t in LOSS_TERMS[losses] for n in t if n != "image"))


# The loss of one pair of sides (post_train's `contrastive_loss`): CLIP's softmax InfoNCE, or SigLIP's pairwise
# sigmoid with the model's learnable logit bias (model.LLM2CLIP(logit_bias_init=...) puts it in the outputs).
PAIR_LOSSES = {
    "softmax": lambda a, b, out: clip_loss(a, b, out["logit_scale"]),
    "sigmoid": lambda a, b, out: siglip_loss(a, b, out["logit_scale"], out["logit_bias"]),
}


def multi_clip_loss(outputs, terms, contrastive_loss="softmax"):
    """Sum of PAIR_LOSSES[contrastive_loss](outputs[a], outputs[b], outputs) over terms (pairs of side names):
    `outputs` is model.LLM2CLIP's forward (or the same dict gathered over chunks). Each term gathers
    its features across ranks like clip_loss, so the sum stays exact under DDP."""
    pair = PAIR_LOSSES[contrastive_loss]
    return sum(pair(outputs[a], outputs[b], outputs) for a, b in terms)


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


def siglip_loss(image_features, text_features, logit_scale, logit_bias):
    """SigLIP's sigmoid loss: every (image, text) pair of the global batch is its own binary decision,
    matching on the diagonal, with logit logit_scale * cos + logit_bias; this rank's image rows against
    every text (gathered with gradient), summed and divided by the local batch, as open_clip's SigLipLoss.

    logit_scale is the multiplier (as clip_loss takes it), logit_bias a scalar; features are L2-normalised
    here. A sum over pairs: the mean over ranks is the full batch's loss (sum over N^2 pairs / N), DDP's
    gradient averaging gives its exact gradient, and gradient caching over chunks stays exact.
    """
    img = F.normalize(_upcast(image_features), dim=-1)  # (B, D)
    all_txt = gather_with_grad(F.normalize(_upcast(text_features), dim=-1))  # (N, D)
    logits = logit_scale * img @ all_txt.T + logit_bias  # (B, N)
    signs = 2 * F.one_hot(_local_labels(img.shape[0], img.device), all_txt.shape[0]).to(logits.dtype) - 1  # +1 / -1
    return -F.logsigmoid(signs * logits).sum() / img.shape[0]


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
# MNTP (llm2vec's masked next-token prediction), stage 1's alternative objective

def mntp_mask_token_id(tokenizer):
    """The token MNTP masks with: the tokenizer's mask token, else "_" (llm2vec's choice for Llama/Mistral)."""
    if tokenizer.mask_token_id is not None:
        return tokenizer.mask_token_id
    ids = tokenizer("_", add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError("mntp: the tokenizer has no mask token and '_' is not a single token; set tokenizer.mask_token")
    return ids[0]


def mntp_special_ids(tokenizer):
    """Every special token id of a HF tokenizer (BOS, EOS, padding, unk, mask and every added special token,
    e.g. <|eot_id|>, <|im_end|>): what llm2vec's collator never selects (get_special_tokens_mask)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return sorted(set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)})


def mntp_mask(input_ids, maskable, mask_token_id, vocab_size, prob=0.2, seeds=None, special_ids=()):
    """llm2vec's MNTP corruption (BERT's 80/10/10 rule) -> (corrupted input_ids, labels), both (B, T).

    Each maskable token is selected with probability `prob`; of the selected, 80% become mask_token_id,
    10% a random token of [0, vocab_size), 10% stay as they are. labels hold the original id at the
    selected positions and -100 elsewhere. Never selected: a token in special_ids (mntp_special_ids: a
    tokenizer's EOS, a chat wrapping's closing token) and a row's first position, which nothing predicts
    (the loss predicts token i from position i-1): without a BOS (Qwen2/3) it is the first caption token.
    Rows must be right-padded; row i's draws come from its own generator seeded by seeds[i] (default: i)
    over its own length, so they do not depend on the batch it sits in (micro-batches, ranks) or on its padding.
    """
    B, T = input_ids.shape
    lengths = maskable.long().cumsum(1).argmax(1) + 1  # up to the last maskable position
    special = torch.as_tensor(list(special_ids), dtype=input_ids.dtype, device=input_ids.device)
    maskable = maskable.bool() & ~torch.isin(input_ids, special)
    maskable[:, 0] = False
    u = torch.ones(B, T, 3)
    rand = torch.zeros(B, T, dtype=torch.long)
    for i in range(B):
        g = torch.Generator().manual_seed(int(seeds[i]) if seeds is not None else i)
        L = int(lengths[i])
        u[i, :L] = torch.rand(L, 3, generator=g)
        rand[i, :L] = torch.randint(vocab_size, (L,), generator=g)
    u, rand = u.to(input_ids.device), rand.to(input_ids.device)
    selected = (u[..., 0] < prob) & maskable
    replaced = selected & (u[..., 1] < 0.8)
    randomised = selected & ~replaced & (u[..., 2] < 0.5)
    ids = torch.where(replaced, torch.full_like(input_ids, mask_token_id), input_ids)
    ids = torch.where(randomised, rand, ids)
    return ids, torch.where(selected, input_ids, torch.full_like(input_ids, -100))


def mntp_num_predicted(labels):
    """The tokens the MNTP loss predicts (labels (B, T), -100 = none): its normaliser, a mean over them as
    llm2vec's (HF's shifted causal-LM loss). A label at position 0 is never predicted, so never counted."""
    return (labels[:, 1:] != -100).sum()


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


def mntp_accumulate(hidden_states, chunks, lm_head_weight, num_predicted, scale=1.0, autocast=None, no_sync=None,
                    scaler=None):
    """One MNTP step over micro-batches: backward of sum-over-chunks CE / num_predicted (mntp_num_predicted
    summed over the whole global batch: every chunk and rank), times `scale` (world size under gradient
    averaging), so the loss is the mean over predicted tokens whatever the chunking. The loss
    is a plain sum over tokens, so accumulating micro-batch gradients is exact: unlike the contrastive
    objectives it needs no gradient caching. hidden_states(chunk) -> (B, T, C), e.g. a TextEncoder's
    `hidden_states` or its DDP wrapper called with pool=False; chunks: dicts with input_ids,
    attention_mask, labels; no_sync: DDP's, entered for every chunk but the last; scaler: a torch.amp.GradScaler
    (float16: each chunk's backward is of the scaled loss). Returns the loss (detached, unscaled)."""
    total = 0.0
    for j, c in enumerate(chunks):
        with (no_sync() if no_sync is not None and j < len(chunks) - 1 else contextlib.nullcontext()):
            with autocast or contextlib.nullcontext():
                hidden = hidden_states(c)
            loss = mntp_loss(hidden, c["labels"], lm_head_weight, reduction="sum") * (scale / max(num_predicted, 1))
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    return total


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


def _flatten(out):
    """forward's output (a tensor, a tuple or a dict of tensors) -> (tuple of tensors, its inverse)."""
    if torch.is_tensor(out):
        return (out,), lambda t: t[0]
    if isinstance(out, dict):
        keys = list(out)
        return tuple(out[k] for k in keys), lambda t: dict(zip(keys, t))
    return tuple(out), tuple


def grad_cache_step(forward, groups, loss_fn, *, no_sync=None, autocast=None, scaler=None):
    """One contrastive step over a batch given in chunks; returns the loss (detached). Afterwards the
    parameters' .grad hold (are incremented by) the gradient of the whole batch's loss.

    groups: the sides embedded by the same model (stage 1: queries, positives, hard negatives; stage
    2: one side of (images, text) chunks), each a list of chunks; forward(chunk) -> a tensor (n, ...),
    or a dict (or tuple) of them. A 0-dim output (the stage-2 model's "logit_scale", "logit_bias") is the same for
    every chunk: the loss sees the first chunk's and its gradient is applied once per side.
    loss_fn(*sides) gets each side's outputs concatenated over its chunks (shaped like forward's) and
    does any cross-rank gathering itself. no_sync: e.g. DDP's `model.no_sync`, entered for every re-run
    but the last, so gradients are all-reduced once. autocast: a context for the forwards. scaler: a
    torch.amp.GradScaler (float16): what is back-propagated is the scaled loss, so half-precision
    activation gradients do not underflow; the loss returned is unscaled.

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
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach()
    # (1) outputs without grad; batched ones concatenated (float32 for the loss), 0-dim ones from the first chunk
    states, cache, rebuild = [], [], []
    with torch.no_grad():
        for side in groups:
            outs = []
            for chunk in side:
                states.append(_RNGState())
                with autocast:
                    flat, unflatten = _flatten(forward(chunk))
                outs.append(flat)
            rebuild.append(unflatten)
            cache.append([_upcast(torch.cat(o) if o[0].ndim else o[0]).detach().requires_grad_() for o in zip(*outs)])
    # (2) the loss of the whole batch and its gradient w.r.t. every output (the loss's gathers run here)
    loss = loss_fn(*[unflatten(tuple(c)) for c, unflatten in zip(cache, rebuild)])
    flat = [x for c in cache for x in c]
    grads = iter(torch.autograd.grad(scaler.scale(loss) if scaler is not None else loss, flat, allow_unused=True))
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
                    out, _ = _flatten(forward(chunk))
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
