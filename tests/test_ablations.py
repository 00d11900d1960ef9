"""Stage-2 ablations (Tables 8, 10, 11): the `losses` variants with CLIP's own text tower (CLIP-T), the Cat head,
the transformer adaptor and LoRA on the LLM online, each against a plain reference computation.

Model-level tests compare every variant's loss and gradient with the formulas written out, under gradient
caching and in a real 2-rank gloo run; post_train-level tests run 1-2 steps of the tiny preset.
"""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, free_port

sys.path.insert(0, ROOT)
import common  # noqa: E402
import data  # noqa: E402
import data_index  # noqa: E402
import loss as L  # noqa: E402
import model as M  # noqa: E402
import pipeline  # noqa: E402
import post_train  # noqa: E402
import zoo  # noqa: E402

torch.set_num_threads(1)
PRESET = os.path.join(ROOT, "config", "post_tiny_cpu.py")
VARIANTS = ("a", "direct", "b", "c", "d")
B, LLM_DIM, D = 8, 24, 16


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel (text width 32, projection 16) with a tokenizer for the synthetic captions."""
    return pipeline.build_tiny_clip(str(tmp_path_factory.mktemp("clip")), texts=[" ".join(data.synthetic_vocabulary())] * 8,
                                    projection_dim=D)


def tiny_vit(embed_dim=D):
    return M.VisionTower("vit_tiny_patch16_224", embed_dim=embed_dim,
                         timm_kwargs=dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2))


def build(losses, clip_dir, seed=0, adaptor="linear"):
    torch.manual_seed(seed)
    clip_text = zoo.load_clip_text(clip_dir) if losses != "a" else None
    net = M.LLM2CLIP(tiny_vit(), LLM_DIM, adaptor_blocks=1, text_sides=L.text_sides(losses), clip_text=clip_text,
                     adaptor=adaptor)
    net.losses = losses  # the variant, for reference_loss and step
    return net


def batch(clip_text, n=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    text = {"llm": torch.randn(n, LLM_DIM, generator=g)}
    words = data.synthetic_vocabulary()
    texts = [" ".join(words[(7 * i + j) % len(words)] for j in range(3 + i % 5)) for i in range(n)]
    if clip_text is not None:
        text.update(clip_text.tokenize(texts))
    return images, text


def plain_clip_loss(a, b, scale):
    """CLIP's symmetric cross-entropy over one full batch, written out (no gather, no helpers)."""
    a, b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    logits = scale * a @ b.T
    idx = torch.arange(a.shape[0])
    return (-logits.log_softmax(1)[idx, idx].mean() - logits.log_softmax(0)[idx, idx].mean()) / 2


def reference_loss(net, images, text, pair=plain_clip_loss):
    """Each variant's loss from the towers called directly (the paper's Table 10 rows, one by one);
    pair(a, b, scale): the loss of one pair of sides."""
    img = net.vision(images)
    scale = net.logit_scale.exp()
    feats = {}
    if net.adaptor is not None:
        feats["llm"] = net.adaptor.proj(net.adaptor.norm(net.adaptor.blocks(F.normalize(text["llm"], dim=-1))))
    if net.clip_text is not None:
        feats["clip_t"] = net.clip_text.model(input_ids=text["clip_ids"], attention_mask=text["clip_mask"]).text_embeds
    if net.losses == "d":
        cat = torch.cat([F.normalize(feats["llm"], dim=-1), F.normalize(feats["clip_t"], dim=-1)], 1)
        feats["cat"] = cat @ net.cat_head.proj.weight.T + net.cat_head.proj.bias
    pairs = {"a": [("llm", img)], "direct": [("clip_t", img)], "b": [("llm", img), ("clip_t", img)],
             "c": [("llm", img), ("clip_t", img), ("clip_t", feats.get("llm"))], "d": [("cat", img)]}[net.losses]
    return sum(pair(feats[name], other, scale) for name, other in pairs)


def step(model, net, images, text, micro=0, contrastive_loss="softmax"):
    """post_train's step: chunks of `micro` (0 = one chunk) through loss.grad_cache_step with the variant's loss."""
    micro = micro or images.shape[0]
    chunks = list(zip(images.split(micro), post_train.split_batch(text, micro)))
    terms = L.LOSS_TERMS[net.losses]
    return L.grad_cache_step(lambda c: model(*c), [chunks], lambda out: L.multi_clip_loss(out, terms, contrastive_loss),
                             no_sync=getattr(model, "no_sync", None))


def grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def assert_same_grads(g1, g2, atol):
    assert g1.keys() == g2.keys()
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=atol, rtol=1e-4), (n, (g1[n] - g2[n]).abs().max().item())


def test_each_losses_variant_equals_plain_reference_and_gradient_cache(clip_dir):
    expected = {"a": ("llm",), "direct": ("clip_t",), "b": ("llm", "clip_t"), "c": ("llm", "clip_t"), "d": ("cat",)}
    for losses in VARIANTS:
        net = build(losses, clip_dir)
        assert net.text_names == expected[losses]
        assert (net.adaptor is None) == (losses == "direct") and (net.cat_head is not None) == (losses == "d")
        images, text = batch(net.clip_text)
        ref = reference_loss(net, images, text)
        ref.backward()
        g_ref = grads(net)
        net.zero_grad(set_to_none=True)
        loss = step(net, net, images, text)
        g_one = grads(net)
        net.zero_grad(set_to_none=True)
        cached = step(net, net, images, text, 3)  # chunks of 3, 3, 2
        g_cached = grads(net)
        assert loss.item() == pytest.approx(ref.item(), abs=1e-5), losses
        assert cached.item() == pytest.approx(ref.item(), abs=1e-5), losses
        assert_same_grads(g_ref, g_one, 1e-5)  # float32: summation order differs
        assert_same_grads(g_ref, g_cached, 1e-5)
        trained = {n.split(".")[0] for n in g_ref}  # which towers a variant trains
        assert ("adaptor" in trained) == (losses != "direct") and ("clip_text" in trained) == (losses != "a"), losses
        assert ("cat_head" in trained) == (losses == "d")


def test_cat_head_output_dim_and_clip_t_space_check(clip_dir):
    torch.manual_seed(0)
    clip_text = zoo.load_clip_text(clip_dir)  # projects to 16
    net = M.LLM2CLIP(tiny_vit(embed_dim=40), LLM_DIM, adaptor_blocks=1, text_sides=L.text_sides("d"), clip_text=clip_text)
    assert (net.cat_head.llm_dim, net.cat_head.clip_dim, net.cat_head.out_dim) == (40, 16, 40)
    images, text = batch(clip_text, n=4)
    out = net(images, text)
    img, cat = out["image"], out["cat"]
    assert out.keys() == {"image", "cat", "logit_scale"}
    assert img.shape == cat.shape == (4, 40) and torch.allclose(cat.norm(dim=-1), torch.ones(4))
    for losses in ("direct", "b", "c"):  # CL(CLIP-T, CLIP-V) needs one space
        with pytest.raises(ValueError, match="clip_text projects to 16-d but the vision tower outputs 40-d"):
            M.LLM2CLIP(tiny_vit(embed_dim=40), LLM_DIM, text_sides=L.text_sides(losses), clip_text=clip_text)
    with pytest.raises(ValueError, match=r"text sides \('llm', 'clip_t'\) need clip_text"):
        M.LLM2CLIP(tiny_vit(), LLM_DIM, text_sides=L.text_sides("b"))
    with pytest.raises(ValueError, match="losses='e'; expected one of a, direct, b, c, d"):
        L.text_sides("e")


def test_siglip_text_tower_matches_siglip_model(tmp_path):
    from transformers import SiglipModel
    path = pipeline.build_tiny_clip(str(tmp_path / "siglip"), kind="siglip", projection_dim=D)
    tower = zoo.load_clip_text(path)
    tok = tower.tokenize(["a red circle", "two blue squares next to a green triangle"])
    assert tok["clip_ids"].shape == (2, 77) and "clip_mask" not in tok  # SigLIP: max-length padding, attended
    full = SiglipModel.from_pretrained(path)
    with torch.no_grad():
        ref = full.get_text_features(input_ids=tok["clip_ids"])
        ref = ref if torch.is_tensor(ref) else ref.pooler_output
        assert torch.allclose(tower(**tok), ref, atol=1e-6)
    assert tower.dim == D


# --- a real 2-rank gloo run: every variant, DDP + gathered losses + gradient caching == one process, full batch

def _ddp_worker(rank, world, port, clip_dir, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    res = {}
    for losses in VARIANTS:  # each rank: 4 of the 8 samples, in 2 gradient-cache chunks of 2
        net = build(losses, clip_dir)
        images, text = batch(net.clip_text)
        lo, hi = rank * B // world, (rank + 1) * B // world
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        loss = step(ddp, net, images[lo:hi], {k: v[lo:hi] for k, v in text.items()}, 2)
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        res[losses] = {"loss": loss.item(), "grads": grads(net)}
    if rank == 0:
        torch.save(res, out)
    dist.destroy_process_group()


def test_every_variant_two_ranks_equals_one_process(clip_dir, tmp_path):
    out = str(tmp_path / "ddp.pt")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port(), clip_dir, out), nprocs=2)
    res = torch.load(out, weights_only=True)
    for losses in VARIANTS:
        net = build(losses, clip_dir)
        images, text = batch(net.clip_text)
        ref = reference_loss(net, images, text)
        ref.backward()
        assert res[losses]["loss"] == pytest.approx(ref.item(), abs=1e-5), losses
        assert_same_grads(grads(net), res[losses]["grads"], 1e-5)


# --- the transformer adaptor (Table 8)

def test_transformer_adaptor_parameter_count_at_2048():
    with torch.device("meta"):  # no memory: only the shapes are counted
        a = M.TransformerAdaptor(2048, 1280, num_layers=1, expansion=4)
    d, out = 2048, 1280
    # attention 4d^2 + 4d, MLP 8d^2 + 5d, two LayerNorms 4d; final LayerNorm 2d; projection d*out + out
    assert sum(p.numel() for p in a.parameters()) == 12 * d * d + 15 * d + d * out + out == 52_985_088
    with torch.device("meta"):
        lin = M.build_adaptor("linear", 2048, 1280, num_blocks=4, expansion=2)
    assert sum(p.numel() for p in lin.parameters()) == 4 * (4 * d * d + 5 * d) + 2 * d + d * out + out


def test_transformer_adaptor_pools_only_masked_tokens_and_gradient_cache():
    torch.manual_seed(0)
    net = M.LLM2CLIP(tiny_vit(), LLM_DIM, adaptor_blocks=1, adaptor="transformer")
    net.losses = "a"
    assert isinstance(net.adaptor, M.TransformerAdaptor)
    g = torch.Generator().manual_seed(3)
    states, mask = torch.randn(B, 6, LLM_DIM, generator=g), torch.ones(B, 6, dtype=torch.long)
    mask[::2, 4:] = 0  # padded captions
    padded = states.clone()
    padded[::2, 4:] = 1e3  # whatever sits at masked positions does not matter
    with torch.no_grad():
        assert torch.allclose(net.adaptor(states, mask), net.adaptor(padded, mask), atol=1e-5)
    images = torch.randn(B, 3, 32, 32, generator=g)
    text = {"llm": states, "llm_mask": mask}
    one = step(net, net, images, text)
    g1 = grads(net)
    net.zero_grad(set_to_none=True)
    cached = step(net, net, images, text, 3)
    assert cached.item() == pytest.approx(one.item(), abs=1e-6)
    assert_same_grads(g1, grads(net), 1e-5)
    with pytest.raises(ValueError, match="needs the LLM's token states"):
        net(images, torch.randn(B, LLM_DIM))


# --- post_train.py: the switches end to end (tiny preset, 1-2 steps)

@pytest.fixture(scope="module")
def w(tmp_path_factory, clip_dir):
    d = tmp_path_factory.mktemp("abl")
    data.make_synthetic_dataset(d / "data", 32, seed=0, image_size=32, split="train")
    data.make_synthetic_dataset(d / "data", 16, seed=0, image_size=32, split="val")
    w = type("World", (), {})()
    w.dir, w.train, w.val = d, str(d / "data" / "train.jsonl"), str(d / "data" / "val.jsonl")
    w.llm = pipeline.build_tiny_text_model(str(d / "llm"), texts=[" ".join(data.synthetic_vocabulary())] * 8)
    import embed_captions
    embed_captions.main([f"--text_model={w.llm}", f"--manifest={w.train}", f"--out_dir={d / 'cache'}"])
    w.cache = str(d / "cache")
    w.clip64 = pipeline.build_tiny_clip(str(d / "clip64"), texts=[" ".join(data.synthetic_vocabulary())] * 8)
    return w


def run(w, out, *extra):
    return post_train.main([PRESET, f"--train_manifest={w.train}", f"--cache_dir={w.cache}", "--val_manifest=",
                            f"--out_dir={out}", "--num_workers=0", "--batch_size=16", "--log_interval=1",
                            "--warmup_steps=2", "--max_steps=1", "--save_interval=1000", *extra])


def last_checkpoint(out):
    return torch.load(common.checkpoint_paths(str(out))[-1], map_location="cpu", weights_only=True)


def test_direct_is_a_plain_clip_finetune_step(w, tmp_path):
    """losses=direct, no cache, no LLM: one post_train step == vision + CLIP-T + CLIP loss + AdamW, by hand."""
    run(w, tmp_path / "direct", "--losses=direct", f"--clip_text={w.clip64}", "--cache_dir=", "--weight_decay=0")
    ck = last_checkpoint(tmp_path / "direct")
    assert not any(k.startswith("adaptor") for k in ck["model"])  # the LLM side is off
    cfg = post_train.common.configure({k: getattr(post_train, k) for k in post_train.config_keys}, [PRESET])
    torch.manual_seed(0)
    vision = M.VisionTower(cfg["vision_model"], embed_dim=cfg["embed_dim"], timm_kwargs=cfg["timm_kwargs"])
    tower = zoo.load_clip_text(w.clip64)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = list(vision.parameters()) + list(tower.parameters()) + [log_scale]
    records = data.read_manifest(w.train)
    samples = data_index.TrainSamples(records, data.TrainTransform(vision.data_config, tuple(cfg["crop_scale"])), None, 0,
                                      cfg["real_caption_ratio"])
    (items,) = list(data_index.EpochBatchSampler(len(records), 16, 0, 1, 0, True, max_steps=1))
    b = data_index.collate_train([samples[i] for i in items])
    tok = tower.tokenizer(b["text"], padding=True, truncation=True, max_length=77, return_tensors="pt")
    loss = plain_clip_loss(vision(b["image"]), tower.model(**tok).text_embeds, log_scale.exp())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
    groups = [{"params": params[:-1]}, {"params": [log_scale], "lr": cfg["logit_scale_lr"] / 3}]  # its own lr
    opt = torch.optim.AdamW(groups, lr=1e-3 / 3, betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["adam_eps"], weight_decay=0)
    opt.step()  # lr: warm-up step 0 of 2 -> learning_rate / 3
    ref = {**{f"vision.{k}": v for k, v in vision.state_dict().items()},
           **{f"clip_text.{k}": v for k, v in tower.state_dict().items()}, "logit_scale": log_scale.detach()}
    assert ref.keys() == ck["model"].keys()
    for k in ref:
        assert torch.allclose(ref[k], ck["model"][k], atol=1e-5), (k, (ref[k] - ck["model"][k]).abs().max().item())


def test_sigmoid_loss_bias_trains_undecayed_is_checkpointed_and_exported(w, tmp_path, capsys):
    """contrastive_loss=sigmoid: the bias starts at SigLIP's -10 (the scale at the config's value), sits in the
    logit scale's no-decay group, moves, is logged, checkpointed, resumed and recorded in llm2clip.json, where
    load_llm2clip's ImageEncoder exposes it; a softmax export has none (read as before)."""
    out = tmp_path / "sigmoid"
    run(w, out, "--contrastive_loss=sigmoid", "--max_steps=2", "--save_interval=1", "--logit_scale_init=None")
    assert "sigmoid loss, logit scale starts at x10.0 (sigmoid default), logit bias at -10.00 (sigmoid default)" \
        in capsys.readouterr().out
    bias = [json.loads(ln)["logit_bias"] for ln in open(out / "metrics.jsonl") if "logit_bias" in ln]
    ck = last_checkpoint(out)
    assert len(bias) == 2 and -10 < bias[0] and bias[-1] == ck["model"]["logit_bias"].item()
    meta = json.load(open(out / "llm2clip.json"))
    assert meta["contrastive_loss"] == "sigmoid" and meta["logit_bias"] == bias[-1] and meta["format_version"] == 1
    image_enc, _ = M.load_llm2clip(str(out), load_text=False)
    assert (image_enc.logit_bias, image_enc.logit_scale) == (meta["logit_bias"], meta["logit_scale"])
    net = M.LLM2CLIP(tiny_vit(), LLM_DIM, 1, logit_bias_init=-10.0)
    (g,) = [g for g in post_train.param_groups(net, ck["config"]) if any(p is net.logit_bias for p in g["params"])]
    assert g["weight_decay"] == 0 and any(p is net.logit_scale for p in g["params"])  # the scale's group
    run(w, out, "--contrastive_loss=sigmoid", "--max_steps=3", "--save_interval=1", "--logit_scale_init=None",
        "--resume=True")
    assert last_checkpoint(out)["step"] == 3 and "resumed from" in capsys.readouterr().out
    run(w, tmp_path / "softmax")
    meta = json.load(open(tmp_path / "softmax" / "llm2clip.json"))
    assert "logit_bias" not in meta and M.load_llm2clip(str(tmp_path / "softmax"), load_text=False)[0].logit_bias is None
    with pytest.raises(ValueError, match="logit_bias_init=-3.0: the logit bias belongs to contrastive_loss='sigmoid'"):
        run(w, tmp_path / "bad", "--logit_bias_init=-3.0")


def test_evaluate_scores_every_text_encoder_of_a_run(w, tmp_path):
    """losses=c exports the LLM side and CLIP-T, losses=d the Cat head: evaluate.py gives each a row, with
    the scores post_train's own held-out eval computed at the last step."""
    import evaluate
    outs = {}
    for losses in ("c", "d"):
        outs[losses] = tmp_path / losses
        run(w, outs[losses], f"--losses={losses}", f"--clip_text={w.clip64}", "--max_steps=2", f"--val_manifest={w.val}",
            "--eval_field=long_captions", "--eval_interval=2")
    res = evaluate.main(["--task=retrieval", f"--model={outs['c']},{outs['d']}", f"--data={w.val}",
                         "--caption_field=long_captions", "--captions_per_image=0", "--num_workers=0"])
    rows = {f"{outs['c']} [llm]": ("c", "llm"), f"{outs['c']} [clip_t]": ("c", "clip_t"), f"{outs['d']} [cat]": ("d", "cat")}
    assert list(res["results"]) == list(rows)
    for row, (losses, name) in rows.items():
        with open(outs[losses] / "metrics.jsonl") as f:
            final = [r for r in map(json.loads, f) if "eval" in r][-1]
        (scores,) = res["results"][row].values()
        for k in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"):
            assert scores[k] == pytest.approx(final[f"eval_{name}"][k], abs=1e-9), (row, k)
    assert "| " + f"{outs['d']} [cat]" in res["table"]


def test_transformer_adaptor_and_lora_are_online_only(w, tmp_path):
    for extra in ("--adaptor=transformer", "--text_lora_r=4"):
        with pytest.raises(ValueError, match=r"need text_source='online': a cache holds one pooled embedding per "
                                             r"caption.*4 MiB per caption at 4096-d x 512 tokens"):
            run(w, tmp_path, extra)
    with pytest.raises(ValueError, match="losses='b' with clip_text='': every variant but 'a'"):
        run(w, tmp_path, "--losses=b")


def test_online_lora_changes_only_lora_vision_adaptor_and_export_reloads(w, tmp_path):
    """text_lora_r>0: base LLM weights stay the stage-1 ones, LoRA moves; the export (peft folder) reloads
    to the embeddings of the trained model. With the transformer adaptor over the LoRA'd LLM's tokens."""
    out = tmp_path / "lora"
    run(w, out, "--text_source=online", "--text_lora_r=4", "--adaptor=transformer", "--adaptor_blocks=1",
        "--max_steps=2", "--micro_batch_size=8")
    ck = last_checkpoint(out)["model"]
    llm = {k: v for k, v in ck.items() if k.startswith("text_encoder.")}
    lora = {k: v for k, v in llm.items() if "lora_" in k}
    assert lora and all(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at zero
    assert lora == llm  # a checkpoint holds what trains: the LoRA, never the frozen LLM
    assert {k.split(".")[0] for k in ck} == {"vision", "adaptor", "text_encoder", "logit_scale"}
    meta = json.load(open(out / "llm2clip.json"))
    assert meta["text"]["lora"] == "text_lora" and meta["adaptor"]["kind"] == "transformer"
    # the training model rebuilt from the checkpoint vs the exported text encoder, on raw captions
    enc = M.load_text_encoder(w.llm, lora=dict(r=4, alpha=8))
    torch.manual_seed(0)
    cfg = post_train.common.configure({k: getattr(post_train, k) for k in post_train.config_keys}, [PRESET])
    vision = M.VisionTower(cfg["vision_model"], embed_dim=cfg["embed_dim"], timm_kwargs=cfg["timm_kwargs"])
    net = M.LLM2CLIP(vision, enc.dim, 1, cfg["adaptor_expansion"], adaptor="transformer", text_encoder=enc)
    common.load_trainable_state(net, ck, "checkpoint")  # the frozen base: the stage-1 weights, as loaded
    net.eval()
    texts = [r["long_captions"][0] for r in data.read_manifest(w.val)[:6]]
    tok = enc.tokenize(texts)
    with torch.no_grad():
        trained = net.encode_text({"llm_ids": tok["input_ids"], "llm_attention_mask": tok["attention_mask"],
                                   "llm_embed_mask": tok["embed_mask"]})
    exported = zoo.load_llm2clip_text(str(out)).encode(texts)
    assert (exported - trained).abs().max().item() < 1e-5


# --- open_clip: an optional dependency for the families transformers lacks (EVA02-CLIP)

def test_open_clip_missing_names_the_pip_package():
    import zoo
    try:
        import open_clip  # noqa: F401
        pytest.skip("open_clip is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="open_clip:EVA02-L-14-336/merged2b_s6b_b61k: open_clip models need the "
                                          "open_clip package.*pip install open_clip_torch"):
        zoo.load_models("open_clip:EVA02-L-14-336/merged2b_s6b_b61k", "cpu")


def test_open_clip_baseline_side_by_side_with_an_export_and_as_clip_t(w, tmp_path):
    """A tiny random open_clip model (config registered here, weights saved locally) and an LLM2CLIP export in
    one evaluate.py table; the open_clip row equals open_clip's own encode_image/encode_text scored directly.
    Then the same model is stage 2's CLIP-T (losses=b), exported and scored as its own row."""
    open_clip = pytest.importorskip("open_clip")
    import evaluate
    import metrics
    cfg = {"embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "tiny-test-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(tmp_path / "cfg"))
    torch.manual_seed(0)
    oc = open_clip.create_model("tiny-test-clip")
    torch.save(oc.state_dict(), tmp_path / "tiny.pt")
    spec = f"open_clip:tiny-test-clip/{tmp_path / 'tiny.pt'}"
    run(w, tmp_path / "export")
    res = evaluate.main(["--task=retrieval", f"--model={spec},{tmp_path / 'export'}", f"--data={w.val}",
                         "--caption_field=long_captions", "--captions_per_image=0", "--num_workers=0"])
    assert list(res["results"]) == [spec, str(tmp_path / "export")]
    records = data.read_manifest(w.val)
    tf = data.eval_transform({"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
                              "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD})
    oc.eval()
    with torch.no_grad():
        img = oc.encode_image(torch.stack([tf(data.open_image(r)) for r in records]))
        txt = oc.encode_text(open_clip.get_tokenizer("tiny-test-clip")([c for r in records for c in r["long_captions"]]))
    t2i = [i for i, r in enumerate(records) for _ in r["long_captions"]]
    direct = metrics.retrieval_metrics(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), t2i)
    (scores,) = res["results"][spec].values()
    for k in direct:
        assert scores[k] == pytest.approx(direct[k], abs=1e-9), k
    # the same open_clip model as stage 2's CLIP-T (losses=b): its export reloads to post_train's own eval
    out = tmp_path / "b"
    run(w, out, "--losses=b", f"--clip_text={spec}", "--max_steps=2", f"--val_manifest={w.val}",
        "--eval_field=long_captions", "--eval_interval=2")
    assert json.load(open(out / "clip_text" / "open_clip.json"))["open_clip"] == "tiny-test-clip"
    assert isinstance(zoo.load_llm2clip_text(str(out), "clip_t"), zoo.OpenCLIPText)  # zoo's loader knows open_clip
    res = evaluate.main(["--task=retrieval", f"--model={out}", f"--data={w.val}", "--caption_field=long_captions",
                         "--captions_per_image=0", "--num_workers=0"])
    with open(out / "metrics.jsonl") as f:
        final = [r for r in map(json.loads, f) if "eval" in r][-1]
    for name in ("llm", "clip_t"):
        (scores,) = res["results"][f"{out} [{name}]"].values()
        assert all(scores[k] == pytest.approx(final[f"eval_{name}"][k], abs=1e-9) for k in ("i2t_R@1", "t2i_R@5")), name
