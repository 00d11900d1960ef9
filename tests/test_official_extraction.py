"""The official code's text side, re-implemented here from its steps and compared with ours on tiny models:
every chat wrapping of llm2vec's prepare_for_tokenization (and chat_template="auto"), the official embedding
extraction (official_extraction=True: strip, wrap, cut, pool the last n), and MNTP's masking and loss
against a hand-computed reference with a BOS-less and an EOS-appending tokenizer."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import embed_captions
import loss as L
import model as M
from cache import EmbeddingCache
import data

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = ["a dog runs on the grass", "a red square next to a blue circle", "user caption image photo",
          "Given a caption, retrieve a similar relevant caption.", "INST small large green"] * 4
INSTRUCTION = "Given a caption, retrieve a similar relevant caption."

# Each family as the official code meets it: the HF name its prepare_for_tokenization matches, the tokenizer's
# special tokens (BOS first if it adds one) and the config's model_type.
FAMILIES = {
    "llama3": ("meta-llama/Meta-Llama-3-8B-Instruct", "llama", "<|begin_of_text|>",
               ["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "mistral": ("mistralai/Mistral-7B-Instruct-v0.2", "mistral", "<s>", ["</s>", "<unk>"]),
    "gemma2": ("google/gemma-2-9b-it", "gemma2", "<bos>", ["<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"]),
    "qwen2": ("Qwen/Qwen2-7B-Instruct", "qwen2", None, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
    "phi3": ("microsoft/Phi-3.5-mini-instruct", "phi3", "<s>", ["</s>", "<|endoftext|>", "<|user|>", "<|end|>"]),
}


def official_prepare(name, text):
    """What the official prepare_for_tokenization makes of a text for a model named `name` (mean pooling)."""
    if "Llama-3" in name and "Instruct" in name:
        return "<|start_header_id|>user<|end_header_id|>\n\n" + text.strip() + "<|eot_id|>"
    turns = {"microsoft/Phi-3.5-mini-instruct": ("<|user|>\n", "<|end|>\n"),
             "mistralai/Mistral-7B-Instruct-v0.2": ("[INST] ", " [/INST]"),
             "meta-llama/Llama-2-7b-chat-hf": ("[INST] ", " [/INST]"),
             "google/gemma-2-9b-it": ("<bos><start_of_turn>user\n", "<end_of_turn>"),
             "Qwen/Qwen2-7B-Instruct": ("<|im_start|>user\n", "<|im_end|>")}
    return turns[name][0] + text.strip() + turns[name][1] if name in turns else text


def tiny_tokenizer(bos, specials, append_eos=None):
    """Byte-level BPE with these special tokens; adds `bos` before and `append_eos` after a text if given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    names = ([bos] if bos else []) + specials
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=names, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    single = " ".join(([bos] if bos else []) + ["$A"] + ([append_eos] if append_eos else []))
    added = [t for t in (bos, append_eos) if t]
    if added:
        tok.post_processor = processors.TemplateProcessing(single=single,
                                                           special_tokens=[(t, tok.token_to_id(t)) for t in added])
    eos = append_eos or specials[0]
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos,
                                   additional_special_tokens=[t for t in specials if t != eos])


def tiny_model(model_type, tokenizer, causal=False):
    """A 1-layer random model of that family, made bidirectional (as every encoder here)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tokenizer) + 8, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=64,
                               max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    m = (AutoModelForCausalLM if causal else AutoModel).from_config(cfg).eval()
    return M.enable_bidirectional(m)


def family(key, append_eos=None):
    name, model_type, bos, specials = FAMILIES[key]
    tok = tiny_tokenizer(bos, specials, append_eos)
    return name, tok, tiny_model(model_type, tok)


@torch.no_grad()
def official_rows(hf_model, tok, name, texts, instruction=None, max_length=512):
    """The official extraction's steps (llm2vec encode, max_length <= its doc_max_length 512): join with the
    separator, prepare, split, tokenise the whole left-padded and cut at max_length, pool the last n
    positions, n = the part after the separator tokenised alone; the model's own positions."""
    sep = "!@#$%^&*()"
    prepared = [official_prepare(name, (instruction.strip() + " " if instruction else "") + sep + t) for t in texts]
    full, pooled = ["".join(p.split(sep)) for p in prepared], [p.split(sep)[1] for p in prepared]
    tok.padding_side = "left"
    try:
        b = tok(full, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    finally:
        tok.padding_side = "right"
    n = [len(tok(p, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]) for p in pooled]
    hidden = hf_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    return torch.stack([hidden[i, -k:].mean(0) for i, k in enumerate(n)]), b, n


# -----------------------------------------------------------------------------
# every chat wrapping of the official code, and "auto"

@pytest.mark.parametrize("key", list(FAMILIES))
def test_each_chat_template_is_the_official_wrapping(key):
    name, tok, hf = family(key)
    assert M.CHAT_TEMPLATES[key] and M.TextEncoder(hf, tok, chat_template="auto").chat_template == key
    for official in (False, True):
        enc = M.TextEncoder(hf, tok, chat_template=key, official_extraction=official)
        for instr in (None, INSTRUCTION):
            text = "A dog runs on the grass."
            want = tok(official_prepare(name, (instr.strip() + " " if instr else "") + text))["input_ids"]
            n = len(tok(official_prepare(name, "!@#$%^&*()" + text).split("!@#$%^&*()")[1],
                        add_special_tokens=False)["input_ids"])
            b = enc.tokenize([text], instr)
            assert b["input_ids"][0].tolist() == want, (key, official, instr)
            assert b["embed_mask"][0].tolist() == [0] * (len(want) - n) + [1] * n  # text + closing tokens
    if key == "gemma2":  # the official string repeats <bos> after the tokenizer's own
        assert want[:2] == [tok.bos_token_id] * 2


def test_auto_resolves_or_names_the_key(tmp_path):
    _, tok, hf = family("mistral")
    # a Llama without Llama-3's tokens (Llama-2-chat or a base model?), a family the official code does not list
    for m in (tiny_model("llama", tok), tiny_model("qwen3", tok)):
        with pytest.raises(ValueError, match=r"^chat_template='auto': cannot tell the chat wrapping of model_type="):
            M.TextEncoder(m, tok, chat_template="auto")
    with pytest.raises(ValueError, match=r"chat_template='auto'.*'qwen2'"):  # the family's tokens are missing
        M.TextEncoder(tiny_model("qwen2", tok), tok, chat_template="auto")
    with pytest.raises(ValueError, match=r"^chat_template='qwen2': <\|im_start\|> is not a special token"):
        M.TextEncoder(hf, tok, chat_template="qwen2")
    check, what = common.chat_template
    assert check("auto") and all(check(k) for k in M.CHAT_TEMPLATES) and not check("llama2") and "phi3" in what
    # load_text_encoder records the resolved key, which is what caches and exports compare
    _, tok3, hf3 = family("llama3")
    hf3.save_pretrained(tmp_path)
    tok3.save_pretrained(tmp_path)
    enc = M.load_text_encoder(str(tmp_path), chat_template="auto")
    assert enc.chat_template == enc.settings["chat_template"] == "llama3"


# -----------------------------------------------------------------------------
# official_extraction=True: the official rows

WORDS = "a small red square next to a large blue circle on the green grass near a wooden table".split()
OFFICIAL_TEXTS = ["A dog runs on the grass.", "A dog runs on the grass.  \n", " a red square next to a blue circle",
                  *[" ".join(WORDS[:k]) for k in (9, 11, 12, 13, 15, 17)], " ".join(WORDS * 3)]


@pytest.mark.parametrize("key,append_eos,chat", [("llama3", None, "llama3"), ("qwen2", None, "qwen2"),
                                                 ("mistral", "</s>", "")],
                         ids=["llama3", "qwen2-no-bos", "eos-no-chat"])
def test_official_extraction_reproduces_the_official_rows(key, append_eos, chat):
    """Trailing whitespace, captions around and far beyond max_length, with and without an instruction:
    our rows equal the re-implemented official ones (its left padding and positions, ours right-padded)."""
    name, tok, hf = family(key, append_eos)
    name = name if chat else "some/local-folder"  # a name the official code wraps nothing for
    enc = M.TextEncoder(hf, tok, chat_template=chat, official_extraction=True)
    default = M.TextEncoder(hf, tok, chat_template=chat)
    for instr, max_length in ((None, 16), (INSTRUCTION, 24), (None, 512)):
        want, b, n = official_rows(hf, tok, name, OFFICIAL_TEXTS, instr, max_length)
        got = enc.encode(OFFICIAL_TEXTS, instr, max_length, batch_size=4)
        assert (got - want).abs().max().item() <= 1e-5, (instr, max_length)
        assert enc.lengths(OFFICIAL_TEXTS, instr, max_length) == b["attention_mask"].sum(1).tolist()
        if max_length == 16:
            assert enc.pop_truncation()["truncated"] >= 4
            assert any(k == 16 for k in n)  # a pooled span that takes in the whole row (BOS and chat head too)
    mine = default.encode(OFFICIAL_TEXTS[:2], None, 512)
    official = enc.encode(OFFICIAL_TEXTS[:2], None, 512)
    # the official code strips only when it wraps: then the trailing whitespace is gone, and a clean caption
    # is laid out as by default
    assert torch.allclose(official[0], official[1], atol=1e-6) == bool(chat)
    if chat:
        assert (mine[0] - official[0]).abs().max().item() <= 1e-5 < (mine[1] - official[1]).abs().max().item()
    with pytest.raises(ValueError, match="official_extraction=True with pooling='eos'"):
        M.TextEncoder(hf, tok, pooling="eos", official_extraction=True)


def test_official_extraction_embed_captions_cache(tmp_path, capsys):
    """embed_captions.py --official_extraction=True: rows equal the official ones, the setting is in meta.json
    and a reader that expects the default refuses the cache (a cache of older code reads as False)."""
    name, tok, hf = family("llama3")
    hf.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text("".join(json.dumps({"captions": OFFICIAL_TEXTS[i:i + 2]}) + "\n" for i in range(0, 10, 2)))
    out = str(tmp_path / "cache")
    args = [f"--text_model={tmp_path / 'llm'}", f"--manifest={manifest}", "--fields=captions", "--chat_template=auto",
            "--max_length=16", "--batch_tokens=64", "--chunk_rows=4"]
    embed_captions.main(args + [f"--out_dir={out}", "--official_extraction=True"])
    assert "official_extraction=True" in capsys.readouterr().out
    meta = json.load(open(os.path.join(out, "meta.json")))["encoder"]
    assert meta["official_extraction"] is True and meta["chat_template"] == "llama3"
    rows = np.asarray(EmbeddingCache(out, expect={"official_extraction": True}).embeddings, np.float32)
    want = official_rows(M.enable_bidirectional(hf), tok, name, OFFICIAL_TEXTS[:10], None, 16)[0].numpy()
    assert np.abs(rows - want).max() <= 2e-3 * np.abs(want).max()  # float16 rows
    with pytest.raises(data.DataError, match="official_extraction: cache True, expected False"):
        EmbeddingCache(out, expect={"official_extraction": False})
    from cache import encoder_mismatch
    assert encoder_mismatch({"pooling": "mean"}, {"official_extraction": False}) == []  # older caches
    with pytest.raises(SystemExit) as e:
        embed_captions.common.run_main(embed_captions.main, args + [f"--out_dir={tmp_path / 'x'}",
                                                                    "--official_extraction=True", "--pooling=eos"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "official_extraction=True: the official extraction pools the mean" in err


# -----------------------------------------------------------------------------
# MNTP: never a special token, and the mean over predicted tokens

MNTP_TEXTS = ["a dog runs on the grass", "a red square", "a small red square next to a large blue circle",
              "photo of a green circle", "user caption", "a large wooden table near the grass", "a dog", "blue"]


def mntp_setup(key, append_eos, chat):
    name, tok, _ = family(key, append_eos)
    causal = tiny_model(FAMILIES[key][1], tok, causal=True)
    enc = M.TextEncoder(causal.model, tok, chat_template=chat)
    return tok, causal, enc, enc.tokenize(MNTP_TEXTS, None, 32)


CASES = [("qwen2", None, ""), ("mistral", "</s>", "")]  # BOS-less (Qwen2/3), EOS appended


@pytest.mark.parametrize("key,append_eos,chat", CASES + [("qwen2", None, "qwen2")],
                         ids=["no-bos", "eos-appended", "im_end-pooled"])
def test_mntp_never_selects_a_special_or_unpredicted_token(key, append_eos, chat):
    tok, _, _, b = mntp_setup(key, append_eos, chat)
    specials = set(tok.all_special_ids)
    assert set(L.mntp_special_ids(tok)) >= specials | {tok.convert_tokens_to_ids(FAMILIES[key][3][-1])}
    maskable = b["embed_mask"] * b["attention_mask"]
    ids, labels = L.mntp_mask(b["input_ids"], maskable, 5, len(tok), 1.0, range(8), L.mntp_special_ids(tok))
    by_hand = torch.zeros_like(maskable, dtype=torch.bool)  # every pooled, non-special token after position 0
    for i, row in enumerate(b["input_ids"].tolist()):
        for t, tid in enumerate(row):
            by_hand[i, t] = t > 0 and bool(maskable[i, t]) and tid not in specials
    assert torch.equal(labels != -100, by_hand) and by_hand.sum() > 30
    pooled_specials = [tid for tid, m in zip(b["input_ids"].flatten().tolist(), maskable.flatten().tolist())
                       if m and tid in specials]
    assert bool(pooled_specials) == bool(append_eos or chat)  # EOS / <|im_end|> pooled, yet never selected
    if key == "qwen2" and not chat:
        assert tok.bos_token_id is None and maskable[:, 0].all()  # the first caption token: pooled, not selected


@pytest.mark.parametrize("key,append_eos,chat", CASES, ids=["no-bos", "eos-appended"])
def test_mntp_loss_is_the_mean_over_predicted_tokens(key, append_eos, chat):
    """mntp_accumulate over 3 chunks (and a label planted at position 0, which nothing predicts) equals the
    mean cross-entropy over predicted tokens computed by hand from the causal LM's logits; so does the gradient."""
    tok, causal, _, b = mntp_setup(key, append_eos, chat)
    ids, labels = L.mntp_mask(b["input_ids"], b["embed_mask"] * b["attention_mask"], 5, len(tok), 0.4, range(8),
                              L.mntp_special_ids(tok))
    labels[2, 0] = b["input_ids"][2, 0]  # as the old masking could select it without a BOS
    att = b["attention_mask"]
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    params = [p for p in causal.model.parameters()]
    logits = causal(input_ids=ids, attention_mask=att, position_ids=pos).logits.float()  # (B, T, V)
    terms = [-F.log_softmax(logits[i, t - 1], -1)[labels[i, t]] for i in range(8) for t in range(1, ids.shape[1])
             if labels[i, t] != -100]
    ref = torch.stack(terms).mean()
    ref_grads = torch.autograd.grad(ref, params)
    assert L.mntp_num_predicted(labels).item() == len(terms) == (labels != -100).sum().item() - 1
    chunks = [{"input_ids": ids[i:i + 3], "attention_mask": att[i:i + 3], "labels": labels[i:i + 3]} for i in (0, 3, 6)]
    hidden = lambda c: causal.model(input_ids=c["input_ids"], attention_mask=c["attention_mask"],  # noqa: E731
                                    position_ids=(c["attention_mask"].cumsum(-1) - 1).clamp(min=0)).last_hidden_state
    causal.zero_grad()
    got = L.mntp_accumulate(hidden, chunks, causal.lm_head.weight.detach(), L.mntp_num_predicted(labels).item())
    assert abs(got.item() - ref.item()) <= 1e-5 * ref.item()
    assert max((p.grad - g).abs().max().item() for p, g in zip(params, ref_grads)) <= 1e-6
    assert max(g.abs().max().item() for g in ref_grads) > 1e-4
