"""model.py: bidirectionality, padding invariance, instruction masking, LoRA, adaptor, losses, vision tower,
gradient caching."""
import contextlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

import loss as L
import model as M
from conftest import free_port

DECODERS = ["llama", "qwen2", "mistral", "gemma"]
TEXTS = ["a red circle", "two blue squares next to a green triangle on the left side of the image",
         "a cat sleeping on a wooden table near a window"]


def first_token_state(hf_model, ids, mask=None):
    out = hf_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states[-1][:, 0].float()


# --- 1. bidirectionality --------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", DECODERS)
def test_bidirectional_attention(tiny_models, arch, attn):
    enc = M.load_text_encoder(tiny_models(arch), bidirectional=False, attn_implementation=attn)
    hf = enc.model.eval()
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (1, 7))
    ids2 = ids.clone()
    ids2[0, -1] = ids[0, -1] + 1
    # padded batch: row 0 is 5 real tokens + 2 pads, row 1 is 7 real tokens
    batch = torch.randint(3, 200, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 5:] = 0
    batch2 = batch.clone()
    batch2[0, 4] += 1  # only row 0's last real token changes

    def changes():
        with torch.no_grad():
            single = not torch.allclose(first_token_state(hf, ids), first_token_state(hf, ids2), atol=1e-6)
            padded = not torch.allclose(first_token_state(hf, batch, mask)[0], first_token_state(hf, batch2, mask)[0],
                                        atol=1e-6)
        return single, padded

    assert changes() == (False, False), "model was not causal to begin with"
    M.enable_bidirectional(hf)
    assert changes() == (True, True)
    assert M.attends_bidirectionally(hf)
    assert M.is_decoder_model(hf) and not M.is_causal_model(hf)


def test_load_text_encoder_makes_decoders_bidirectional_by_default(tiny_models):
    enc = M.load_text_encoder(tiny_models("llama"))
    assert M.attends_bidirectionally(enc.model) and enc.settings["bidirectional"] is True
    bert = M.load_text_encoder(tiny_models("bert"))
    assert not bert.is_decoder and M.attends_bidirectionally(bert.model)


# --- 2. padding invariance ------------------------------------------------------------------------

def left_pad(batch, pad_id):
    out = {k: torch.zeros_like(v) for k, v in batch.items()}
    out["input_ids"].fill_(pad_id)
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        for k in out:
            out[k][i, -n:] = batch[k][i, :n]
    return out


@pytest.mark.parametrize("pooling", ["mean", "eos"])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_padding_invariance(tiny_models, arch, pooling):
    enc = M.load_text_encoder(tiny_models(arch), pooling=pooling, attn_implementation="sdpa").eval()
    with torch.no_grad():
        alone = enc(**enc.tokenize(TEXTS[:1]))[0]
        right = enc.tokenize(TEXTS)
        assert right["attention_mask"][0].sum() < right["attention_mask"].shape[1]  # really padded
        in_right = enc(**right)[0]
        in_left = enc(**left_pad(right, enc.pad_id))[0]
    assert (alone - in_right).abs().max() <= 1e-5
    assert (alone - in_left).abs().max() <= 1e-5
    enc_all = enc.encode(TEXTS, batch_size=2)  # sorted batches give the same result too
    assert (enc_all[0] - alone).abs().max() <= 1e-5


# --- 3. instruction masking -----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_instruction_is_attended_but_not_pooled(tiny_models, arch):
    enc = M.load_text_encoder(tiny_models(arch)).eval()
    instr = "Given a caption, retrieve a similar relevant caption."
    instr_ids = enc.tokenizer(instr, add_special_tokens=False)["input_ids"]
    # the text's tokens as they read after the instruction (llm2vec joins them with a space)
    text_ids = enc.tokenizer(instr + " " + TEXTS[1], add_special_tokens=False)["input_ids"][len(instr_ids):]
    b = enc.tokenize([TEXTS[1]], instruction=instr)
    ids, pool = b["input_ids"][0].tolist(), b["embed_mask"][0].tolist()
    p = len(enc.prefix)
    assert ids[p:p + len(instr_ids)] == instr_ids and not any(pool[p:p + len(instr_ids)])
    body = [t for t, m in zip(ids[p + len(instr_ids):], pool[p + len(instr_ids):]) if m]
    assert body == text_ids + enc.suffix  # pooled span = the text (+ the tokenizer's suffix special token)
    assert pool[:p] == [int(arch == "bert")] * p  # [CLS] pooled for BERT-likes, a decoder's BOS never
    with torch.no_grad():
        hidden = enc.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        manual = hidden[0][torch.tensor(pool, dtype=torch.bool)].mean(0)
        with_instr = enc(**b)[0]
        without = enc.encode([TEXTS[1]])[0]
    assert (manual - with_instr).abs().max() <= 1e-5
    assert (with_instr - without).abs().max() > 1e-4  # the instruction is attended


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def llama3_style(tmp_path_factory):
    """A tiny Llama with a Llama-3-style tokenizer: byte-level BPE (no prefix space), BOS
    <|begin_of_text|> added, the chat special tokens, no pad token. Saved as a HF folder."""
    import pipeline
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoModel, PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS * 4 + ["user", "A dog", "caption. A dog runs on the grass."] * 8, trainers.BpeTrainer(
        vocab_size=300, special_tokens=LLAMA3_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                     additional_special_tokens=LLAMA3_SPECIALS[1:])
    d = str(tmp_path_factory.mktemp("llama3_style"))
    torch.manual_seed(0)
    AutoModel.from_config(pipeline.tiny_text_config("llama", len(hf_tok) + 8, tokenizer=hf_tok)).save_pretrained(d)
    hf_tok.save_pretrained(d)
    return d


def test_instruction_keeps_the_texts_leading_space_token(llama3_style):
    """With a byte-level BPE tokenizer the pooled span is the text's tokens as they read
    in `instruction + " " + text` (llm2vec), not the text tokenised alone ("...caption.A dog")."""
    enc = M.load_text_encoder(llama3_style).eval()
    tok, instr, text = enc.tokenizer, "Given a caption, retrieve a similar relevant caption.", "A dog runs on the grass."
    instr_ids = tok(instr, add_special_tokens=False)["input_ids"]
    joined = tok(instr + " " + text, add_special_tokens=False)["input_ids"]
    assert joined[:len(instr_ids)] == instr_ids
    want = joined[len(instr_ids):]
    assert tok.convert_ids_to_tokens(want[:1]) == ["ĠA"]  # Llama-3 has the merge too: " A" is one token
    assert want != tok(text, add_special_tokens=False)["input_ids"]  # "ĠA" vs "A": today's code pooled the latter
    b = enc.tokenize([text], instruction=instr)
    ids, pool = b["input_ids"][0].tolist(), b["embed_mask"][0].tolist()
    assert ids == enc.prefix + joined  # the whole sequence is the joined string's tokens
    assert [t for t, m in zip(ids, pool) if m] == want
    assert enc.lengths([text], instr) == [len(ids)]


def test_llama3_chat_template_matches_the_official_layout(llama3_style):
    """chat_template="llama3" lays a caption out as the official embedding extraction
    (llm2vec's prepare_for_tokenization + tokenize) does, with <|eot_id|> pooled; recorded in settings."""
    enc = M.load_text_encoder(llama3_style, chat_template="llama3").eval()
    assert enc.settings["chat_template"] == "llama3"
    tok = enc.tokenizer
    for instr in (None, "Given a caption, retrieve a similar relevant caption."):
        text = "A dog runs on the grass."
        # the official code: "instr !@#$%^&*()text" -> wrapped -> split at the separator; the whole string is
        # tokenised with special tokens, and the last len(tokens of text + <|eot_id|>) positions are pooled
        body = (instr.strip() + " " if instr else "") + text
        official = tok("<|start_header_id|>user<|end_header_id|>\n\n" + body.strip() + "<|eot_id|>")["input_ids"]
        n_pool = len(tok(text + "<|eot_id|>", add_special_tokens=False)["input_ids"])
        b = enc.tokenize([text], instruction=instr)
        ids, pool = b["input_ids"][0].tolist(), b["embed_mask"][0].tolist()
        assert ids == official
        assert pool == [0] * (len(official) - n_pool) + [1] * n_pool
        assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>") and ids[1] == tok.convert_tokens_to_ids(
            "<|start_header_id|>") and ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>") and pool[-1] == 1
    import pipeline
    plain = M.load_text_encoder(llama3_style)
    assert plain.tokenize(["A dog"])["input_ids"].shape[1] < enc.tokenize(["A dog"])["input_ids"].shape[1]
    with pytest.raises(ValueError, match=r"chat_template='llama3': <\|start_header_id\|> is not a special token"):
        M.TextEncoder(plain.model, pipeline.train_tokenizer(TEXTS, 200, style="encoder"), chat_template="llama3")


def test_stage1_out_dir_restores_its_text_encoder_settings(llama3_style, tmp_path):
    """load_text_encoder(out_dir) restores bidirectional, pooling and chat_template from encoder.json
    (instruction and max_length in .settings); an explicit argument overrides each."""
    import json
    import shutil
    shutil.copytree(llama3_style, tmp_path / "merged")
    (tmp_path / "encoder.json").write_text(json.dumps({
        "model_subdir": "merged", "bidirectional": False, "pooling": "eos", "chat_template": "llama3",
        "instruction": "Given a caption, retrieve a similar relevant caption.", "max_length": 64}))
    enc = M.load_text_encoder(str(tmp_path))
    assert (enc.pooling, enc.chat_template, enc.settings["bidirectional"]) == ("eos", "llama3", False)
    assert M.is_causal_model(enc.model) and enc.settings["max_length"] == 64 and enc.settings["instruction"]
    assert enc.tokenize(["A dog"])["input_ids"][0, -1].item() == enc.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    over = M.load_text_encoder(str(tmp_path), bidirectional=True, pooling="mean", chat_template="none")
    assert (over.pooling, over.chat_template, over.settings["bidirectional"]) == ("mean", "", True)


def test_empty_text_is_an_error(tiny_models):
    enc = M.load_text_encoder(tiny_models("llama"))
    with pytest.raises(ValueError, match="text 1 is empty"):
        enc.tokenize(["ok", ""])
    with pytest.raises(ValueError, match="text 2 is empty"):  # input index, though encode sorts by length
        enc.encode(["a", "a longer text", "", "b"], batch_size=2)


# --- 4. LoRA --------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_lora_merge_and_save_load(tiny_models, tmp_path, arch):
    enc = M.load_text_encoder(tiny_models(arch), lora=dict(r=4, alpha=8, dropout=0.0))
    names = [n for n, p in enc.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    expected = M.DECODER_LORA_TARGETS if arch != "bert" else M.ENCODER_LORA_TARGETS
    assert set(enc.model.peft_config["default"].target_modules) == set(expected)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in enc.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # lora_B starts at zero: make the adapter do something
    enc.eval()
    unmerged = enc.encode(TEXTS)
    enc.model.save_pretrained(tmp_path / "adapter")
    loaded = M.load_text_encoder(tiny_models(arch), lora=str(tmp_path / "adapter")).eval()
    assert (loaded.encode(TEXTS) - unmerged).abs().max() <= 1e-5
    enc.model = M.merge_lora(enc.model)
    assert not any("lora_" in n for n, _ in enc.model.named_parameters())
    merged = enc.encode(TEXTS)
    assert (merged - unmerged).abs().max() <= 1e-5
    plain = M.load_text_encoder(tiny_models(arch)).encode(TEXTS)
    assert (plain - unmerged).abs().max() > 1e-3  # the adapter really changed the encoder


# --- 5. adaptor -----------------------------------------------------------------------------------

def test_adaptor_parameter_count_and_shape():
    a = M.Adaptor(2048, 1280, num_blocks=4, expansion=2)
    block_params = sum(p.numel() for p in a.blocks.parameters())
    assert abs(block_params / 67.1e6 - 1) <= 0.005, block_params
    assert len(a.blocks) == 4
    x = torch.randn(3, 2048)
    y = a(x)
    assert y.shape == (3, 1280)
    assert torch.allclose(a(5.0 * x), y, atol=1e-5)  # input is L2-normalised first
    a0 = M.Adaptor(16, 8, num_blocks=0)
    assert [type(m).__name__ for m in a0.children()] == ["Sequential", "LayerNorm", "Linear"]
    x = torch.randn(4, 16)
    assert torch.allclose(a0(x), a0.proj(a0.norm(F.normalize(x, dim=-1))), atol=1e-6)
    blk = a.blocks[0]
    z = torch.randn(2, 2048)
    assert torch.allclose(blk(z), z + blk.fc2(F.gelu(blk.fc1(blk.norm(z)))), atol=1e-6)


# --- 6. losses ------------------------------------------------------------------------------------

def naive_clip_loss(img, txt, scale):
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        li = scale * (img[i] * txt).sum(-1)
        lt = scale * (txt[i] * img).sum(-1)
        total = total - (li[i] - torch.logsumexp(li, 0)) - (lt[i] - torch.logsumexp(lt, 0))
    return total / (2 * n)


def naive_simcse(q, d, t, hn=None):
    q, d = q / q.norm(dim=-1, keepdim=True), d / d.norm(dim=-1, keepdim=True)
    cands = d if hn is None else torch.cat([d, hn / hn.norm(dim=-1, keepdim=True)])
    total = 0.0
    for i in range(q.shape[0]):
        s = (q[i] * cands).sum(-1) / t
        total = total - (s[i] - torch.logsumexp(s, 0))
    return total / q.shape[0]


def test_losses_match_float64_reference():
    torch.manual_seed(0)
    img, txt, hn = (torch.randn(6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    ours = L.clip_loss(img, txt, scale.exp())
    ref = naive_clip_loss(img, txt, scale.exp())
    g_ours = torch.autograd.grad(ours, [img, txt, scale])
    g_ref = torch.autograd.grad(ref, [img, txt, scale])
    assert abs(ours.item() - ref.item()) <= 1e-10
    for a, b in zip(g_ours, g_ref):
        assert (a - b).abs().max() <= 1e-10
    for neg in (None, hn):
        ours = L.caption_contrastive_loss(img, txt, 0.05, neg)
        ref = naive_simcse(img, txt, 0.05, neg)
        assert abs(ours.item() - ref.item()) <= 1e-10
        g_ours = torch.autograd.grad(ours, [img, txt])
        g_ref = torch.autograd.grad(ref, [img, txt])
        for a, b in zip(g_ours, g_ref):
            assert (a - b).abs().max() <= 1e-10


def _ddp_worker(rank, world, port, x, y, w_state, out_dir):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    b = x.shape[0] // world
    results = {}
    for name in ("clip", "simcse", "simcse_hn"):
        lin = torch.nn.Linear(x.shape[1], 6, dtype=torch.float64)
        lin.load_state_dict(w_state)
        scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
        xs, ys = x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]
        if name == "clip":
            loss = L.clip_loss(lin(xs), lin(ys) * 0.5 + 1, scale.exp())
        else:
            hn = lin(ys.flip(0)) if name == "simcse_hn" else None
            loss = L.caption_contrastive_loss(lin(xs), lin(ys), 0.1, hn)
        loss.backward()
        grads = [lin.weight.grad, lin.bias.grad] + ([scale.grad] if name == "clip" else [])
        for g in grads:  # what DDP does: average the gradients over ranks
            dist.all_reduce(g)
            g /= world
        lv = loss.detach().clone()
        dist.all_reduce(lv)
        results[name] = (lv / world, [g.clone() for g in grads])
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "ddp.pt"))
    dist.destroy_process_group()


def test_losses_under_ddp_equal_full_batch(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    lin0 = torch.nn.Linear(5, 6, dtype=torch.float64)
    state = {k: v.clone() for k, v in lin0.state_dict().items()}
    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), x, y, state, str(tmp_path)), nprocs=2)
    ddp = torch.load(tmp_path / "ddp.pt")
    for name in ("clip", "simcse", "simcse_hn"):
        lin = torch.nn.Linear(5, 6, dtype=torch.float64)
        lin.load_state_dict(state)
        scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
        if name == "clip":
            loss = L.clip_loss(lin(x), lin(y) * 0.5 + 1, scale.exp())
        else:
            # the full-batch equivalent of per-rank hard negatives: each rank's flipped half
            hn = lin(torch.cat([y[:4].flip(0), y[4:].flip(0)])) if name == "simcse_hn" else None
            loss = L.caption_contrastive_loss(lin(x), lin(y), 0.1, hn)
        loss.backward()
        grads = [lin.weight.grad, lin.bias.grad] + ([scale.grad] if name == "clip" else [])
        d_loss, d_grads = ddp[name]
        assert abs(d_loss.item() - loss.item()) <= 1e-9, name
        for a, b in zip(d_grads, grads):
            assert (a - b).abs().max() <= 1e-6, name


# --- 7. vision tower ------------------------------------------------------------------------------

def tiny_vit(**kw):
    return M.VisionTower("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_heads=2,
                         timm_kwargs={"embed_dim": 32}, **kw)


def test_vision_tower_config_and_grad_checkpointing():
    torch.manual_seed(0)
    v = M.VisionTower("vit_tiny_patch16_224", embed_dim=16, img_size=32, patch_size=8, depth=2, num_heads=2)
    assert v.output_dim == 16
    cfg = v.data_config
    assert cfg["input_size"] == (3, 32, 32) and cfg["interpolation"] == "bicubic"
    assert len(cfg["mean"]) == 3 and len(cfg["std"]) == 3 and "crop_pct" in cfg
    v0 = M.VisionTower("vit_tiny_patch16_224", embed_dim=0, img_size=32, patch_size=8, depth=2, num_heads=2)
    assert v0.output_dim == v0.model.num_features == 192
    x = torch.randn(3, 3, 32, 32)

    def fwd_bwd(ckpt):
        v.zero_grad()
        v.set_grad_checkpointing(ckpt)
        y = v(x)
        y.pow(2).sum().backward()
        return y.detach(), [p.grad.clone() for p in v.parameters()]

    y0, g0 = fwd_bwd(False)
    y1, g1 = fwd_bwd(True)
    assert y0.shape == (3, 16)
    assert torch.allclose(y0, y1, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1))


def test_vision_tower_local_weights(tmp_path):
    torch.manual_seed(0)
    src = tiny_vit(embed_dim=16)
    torch.save(src.model.state_dict(), tmp_path / "w.pt")
    same = tiny_vit(embed_dim=16, weights=str(tmp_path / "w.pt"))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(src(x), same(x))
    newhead = tiny_vit(embed_dim=8, weights=str(tmp_path / "w.pt"))  # new head size keeps its fresh init
    assert newhead(x).shape == (2, 8)
    torch.save({"nope": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt: weights do not match"):
        tiny_vit(embed_dim=16, weights=str(tmp_path / "bad.pt"))


def test_llm2clip_forward_normalised():
    m = M.LLM2CLIP(tiny_vit(embed_dim=16), text_dim=24, adaptor_blocks=1)
    out = m(torch.randn(2, 3, 32, 32), torch.randn(2, 24))
    assert out.keys() == {"image", "llm", "logit_scale"}  # named outputs
    img, txt, scale = out["image"], out["llm"], out["logit_scale"]
    assert img.shape == txt.shape == (2, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2)) and torch.allclose(txt.norm(dim=-1), torch.ones(2))
    assert abs(scale.item() - 1 / 0.07) < 1e-4


# --- 8. gradient caching --------------------------------------------------------------------------

class _Toy(torch.nn.Module):
    """Stage 2 in miniature: an image tower with dropout, a text tower, a shared logit scale."""

    def __init__(self, dropout):
        super().__init__()
        self.image = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(dropout), torch.nn.GELU(),
                                         torch.nn.Linear(16, 5))
        self.text = torch.nn.Linear(4, 5)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, x, e):
        return self.image(x), self.text(e), self.logit_scale.exp()


def _take_grads(module):
    out = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("stage", [1, 2])
def test_grad_cache_step_equals_full_batch(stage, dropout):
    """Chunks of 4, 4, 2: the loss and every gradient (the shared logit scale's included, applied once)
    equal those of one autograd graph over the whole batch; dropout masks are replayed; DDP's no_sync
    is entered for every re-run but the last; the RNG stream is left as the forwards left it."""
    torch.manual_seed(0)
    toy = _Toy(dropout).double().train()
    a, b, c = (torch.randn(10, 6, dtype=torch.float64) for _ in range(3))
    e = torch.randn(10, 4, dtype=torch.float64)
    if stage == 2:  # one side of (images, text) chunks -> (image features, text features, logit scale)
        forward, loss_fn = (lambda ch: toy(*ch)), (lambda out: L.clip_loss(*out))
        groups = [list(zip(a.split(4), e.split(4)))]
    else:  # queries, positives and hard negatives through one encoder
        forward, loss_fn = toy.image, (lambda q, d, h: L.caption_contrastive_loss(q, d, 0.05, h))
        groups = [list(t.split(4)) for t in (a, b, c)]

    def reference(n):  # the whole batch in one graph, forwards of n rows (n < 10: the masks the helper replays)
        if stage == 2:
            outs = [toy(a[i:i + n], e[i:i + n]) for i in range(0, 10, n)]
            return L.clip_loss(torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), outs[0][2])
        q, d, h = (torch.cat([toy.image(t[i:i + n]) for i in range(0, 10, n)]) for t in (a, b, c))
        return L.caption_contrastive_loss(q, d, 0.05, h)

    torch.manual_seed(1)
    ref = reference(4 if dropout else 10)
    ref.backward()
    g_ref, rng_ref = _take_grads(toy), torch.get_rng_state()
    entered = []
    no_sync = lambda: entered.append(1) or contextlib.nullcontext()  # noqa: E731
    torch.manual_seed(1)
    loss = L.grad_cache_step(forward, groups, loss_fn, no_sync=no_sync)
    g = _take_grads(toy)
    assert g.keys() == g_ref.keys() and ("logit_scale" in g) == (stage == 2)
    assert min(v.abs().max().item() for v in g_ref.values()) > 1e-3  # every gradient is a real one
    assert abs(loss.item() - ref.item()) < 1e-12
    assert max((g[k] - g_ref[k]).abs().max().item() for k in g) < 1e-12
    assert len(entered) == 3 * len(groups) - 1  # 3 chunks per side; the last re-run all-reduces
    assert torch.equal(torch.get_rng_state(), rng_ref)  # a resumed run draws the same numbers next
    if dropout:  # and dropout really is on: another seed, another gradient
        torch.manual_seed(2)
        L.grad_cache_step(forward, groups, loss_fn)
        assert max((v - g_ref[k]).abs().max().item() for k, v in _take_grads(toy).items()) > 1e-4
    else:  # one chunk per side: the plain forward + backward, no no_sync
        whole = [[(a, e)]] if stage == 2 else [[a], [b], [c]]
        entered.clear()
        loss = L.grad_cache_step(forward, whole, loss_fn, no_sync=no_sync)
        assert abs(loss.item() - ref.item()) < 1e-12 and not entered
        assert max((v - g_ref[k]).abs().max().item() for k, v in _take_grads(toy).items()) < 1e-12


# --- artefact formats: encoder.json and llm2clip.json, each writer beside its reader

@pytest.mark.parametrize("write,read,name", [(M.write_encoder_config, M.read_encoder_config, "encoder.json"),
                                             (M.write_llm2clip_config, M.read_llm2clip_config, "llm2clip.json")])
def test_format_files_carry_a_version_and_old_ones_still_load(tmp_path, write, read, name):
    import json
    write(str(tmp_path), {"pooling": "mean"})
    assert read(str(tmp_path)) == {"format_version": 1, "pooling": "mean"}
    (tmp_path / name).write_text(json.dumps({"pooling": "mean"}))  # written before versions existed
    assert read(str(tmp_path)) == {"pooling": "mean"}
    (tmp_path / name).write_text(json.dumps({"format_version": 2}))
    with pytest.raises(ValueError, match=rf"{name}: format_version 2 is newer than this code reads \(1\)"):
        read(str(tmp_path))
    (tmp_path / name).write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{name}: expected a JSON object, got list"):
        read(str(tmp_path))
    os.remove(tmp_path / name)
    with pytest.raises(ValueError, match=rf"no {name}; expected a"):
        read(str(tmp_path))
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # the writer leaves no temp file
