"""downstream.py: the transformers export of the vision tower, the linear probe, the multilingual converters."""
import glob
import json
import math
import os
import re

import pytest
import torch
import torch.nn as nn
from PIL import Image

import downstream
import evaluate
import model as M
import zoo
from conftest import ROOT, find_shared_data
from data import DataError, eval_transform, make_synthetic_dataset

torch.set_num_threads(1)
TINY = dict(img_size=56, patch_size=14, embed_dim=32, depth=3, num_heads=2)  # 4x4 patches, 56 px as in /14 towers


def tiny_tower(name, head=24, patch_bias=False, seed=0, img_size=56):
    """A scaled-down timm tower with every weight randomised (LayerNorms included), so a swapped or
    missed tensor in the mapping shows."""
    torch.manual_seed(seed)
    v = M.VisionTower(name, embed_dim=head, timm_kwargs={**TINY, "img_size": img_size})
    if patch_bias:  # timm's CLIP towers have none (pre-norm); a bias must fold into the position table
        old = v.model.patch_embed.proj
        v.model.patch_embed.proj = nn.Conv2d(3, old.out_channels, old.kernel_size, old.stride, bias=True)
    with torch.no_grad():
        for p in v.model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return v.eval()


TOWERS = {"clip_quickgelu": ("vit_base_patch16_clip_quickgelu_224.openai", False, "CLIPVisionModel"),
          "clip_patch_bias": ("vit_base_patch16_clip_224.openai", True, "CLIPVisionModel"),
          "siglip": ("vit_base_patch16_siglip_224.v2_webli", False, "SiglipVisionModel"),
          # 60 px / 14 leaves a remainder, as so400m at 384 px does
          "siglip_remainder": ("vit_base_patch16_siglip_224.v2_webli", False, "SiglipVisionModel")}
IMG = {"siglip_remainder": 60}


@pytest.mark.parametrize("kind", list(TOWERS))
def test_export_matches_timm_hidden_states_and_embedding(tmp_path, kind):
    import transformers
    name, bias, cls = TOWERS[kind]
    img = IMG.get(kind, 56)
    v = tiny_tower(name, patch_bias=bias, img_size=img)
    family, diff = downstream.export_hf(v, str(tmp_path))
    assert family == cls[:-len("VisionModel")].lower() and diff < 1e-5
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == [cls] and cfg["hidden_act"] == ("quick_gelu" if kind == "clip_quickgelu" else "gelu")
    proc = transformers.AutoImageProcessor.from_pretrained(str(tmp_path), backend="pil")  # SigLIP too: resize + crop
    assert (proc.crop_size, proc.size) == ({"height": img, "width": img}, {"shortest_edge": int(img / 0.9)})
    assert (tuple(proc.image_mean), tuple(proc.image_std)) == (v.data_config["mean"], v.data_config["std"])
    hf = getattr(transformers, cls).from_pretrained(str(tmp_path)).eval()
    x = torch.randn(3, 3, img, img, generator=torch.Generator().manual_seed(1))
    hidden, emb = downstream.hf_forward(hf, str(tmp_path), x)
    want = downstream.timm_hidden_states(v.model, x)
    assert len(hidden) == len(want) == TINY["depth"] + 1  # embeddings, then one per block: LLaVA's [-2] is block -2
    for a, b in zip(hidden, want):
        assert torch.allclose(a, b, rtol=0, atol=1e-5), (a - b).abs().max()
    assert emb.shape == (3, 24) and torch.allclose(emb, v(x), rtol=0, atol=1e-5)
    # the post-trained model's image embedding (what retrieval scores) is the normalised projection
    assert torch.allclose(nn.functional.normalize(emb, dim=-1), M.ImageEncoder(v)(x), atol=1e-5)


def test_export_checks_itself_against_timm(tmp_path, monkeypatch):
    """A mapping mistake (q and k swapped in one layer) is caught by export_hf's own reload-and-compare."""
    real = downstream.hf_vision_state_dict

    def swapped(vit, family):
        sd = real(vit, family)
        p = "encoder.layers.1.self_attn."
        sd[p + "q_proj.weight"], sd[p + "k_proj.weight"] = sd[p + "k_proj.weight"], sd[p + "q_proj.weight"]
        return sd
    monkeypatch.setattr(downstream, "hf_vision_state_dict", swapped)
    with pytest.raises(RuntimeError, match=r"differs from timm's tower \(max relative difference .*not a faithful export"):
        downstream.export_hf(tiny_tower(TOWERS["siglip"][0]), str(tmp_path))
    assert os.listdir(tmp_path) == []  # nothing half-right is left to load


def test_export_refuses_eva02_and_names_the_supported_families(tmp_path):
    v = M.VisionTower("eva02_tiny_patch14_224.mim_in22k", timm_kwargs=dict(depth=1))
    with pytest.raises(downstream.UnsupportedTower, match=r"a timm Eva, not a VisionTransformer; export_hf supports "
                       r"OpenAI-CLIP.*SigLIP/SigLIP2.*timm export \(vision_tower.pt \+ llm2clip.json"):
        downstream.export_hf(v, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


def _crop_offsets_agree(size, data_config):
    """torchvision (ours) centres a crop at round-half-even((L - c) / 2), transformers at floor: the same
    unless L - c is 3 mod 4 (then ours starts one pixel later)."""
    c = data_config["input_size"][1]
    short = math.floor(c / data_config["crop_pct"])
    long_side = int(short * max(size) / min(size))
    return [(L - c) % 4 != 3 for L in (short, long_side)]


def test_exported_processor_reproduces_our_eval_transform_on_real_images(tmp_path):
    from transformers import AutoImageProcessor
    shared = find_shared_data()
    images = sorted(glob.glob(os.path.join(shared or "/nonexistent", "images", "coco6", "*.jpg")))
    if not images:
        pytest.skip("shared/data/images/coco6 not found")
    v = tiny_tower(TOWERS["clip_quickgelu"][0])
    downstream.hf_image_processor(v.data_config).save_pretrained(str(tmp_path))
    pil = AutoImageProcessor.from_pretrained(str(tmp_path), backend="pil")
    fast = AutoImageProcessor.from_pretrained(str(tmp_path))  # transformers' default: torchvision tensors
    assert (pil.crop_size["height"], pil.size["shortest_edge"]) == (56, 62) and tuple(pil.image_mean) == v.data_config["mean"]
    ours_tf, exact = eval_transform(v.data_config), 0
    for path in images:
        im = Image.open(path).convert("RGB")
        ours = ours_tf(im)
        theirs = pil(images=im, return_tensors="pt")["pixel_values"][0]
        assert ours.shape == theirs.shape == (3, 56, 56)
        short_ok, long_ok = _crop_offsets_agree(im.size, v.data_config)
        assert short_ok  # 62 - 56 = 6: the short side never differs at this size
        if long_ok:
            exact += 1
            assert (ours - theirs).abs().max() <= 1e-6, path
            assert (ours - fast(images=im, return_tensors="pt")["pixel_values"][0]).abs().max() < 0.05
        else:  # documented: transformers' crop starts one pixel earlier along the long side
            ax = 2 if im.size[0] > im.size[1] else 1
            assert (ours.narrow(ax, 0, 55) - theirs.narrow(ax, 1, 55)).abs().max() <= 1e-6, path
    assert exact >= 3  # most real images take the exact path


def readme_snippet():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    m = re.search(r"<!-- llava-snippet -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md has no <!-- llava-snippet --> python block"
    return m.group(1)


def test_export_hf_task_and_the_readme_llava_snippet(tmp_path):
    """evaluate.py --task=export_hf on a real post_train.py export; the README's LLaVA snippet runs on it."""
    v = tiny_tower(TOWERS["clip_quickgelu"][0])
    out = tmp_path / "out"
    out.mkdir()
    zoo.export(str(out), M.LLM2CLIP(v, text_dim=16, adaptor_blocks=1), {},
                      {"model": "unused", "pooling": "mean", "instruction": None, "max_length": 32})
    hf_dir = tmp_path / "hf"
    res = evaluate.main(["--task=export_hf", f"--model={out}", f"--out={hf_dir}"])
    assert res["family"] == "clip" and res["max_relative_difference"] < 1e-5
    run = json.loads((hf_dir / "run_evaluate.json").read_text())
    assert run["export_hf"]["source"] == str(out) and run["code_version"]
    image = tmp_path / "img.png"
    Image.new("RGB", (70, 56), (200, 30, 90)).save(image)
    scope = {"HF_DIR": str(hf_dir), "IMAGE": str(image)}
    exec(readme_snippet(), scope)
    pixels = scope["pixels"]
    want = downstream.timm_hidden_states(v.model, pixels)
    assert torch.allclose(scope["features"], want[-2], rtol=0, atol=1e-5)  # LLaVA-1.5: penultimate layer
    assert torch.allclose(scope["embedding"], M.ImageEncoder(v)(pixels), atol=1e-5)
    with pytest.raises(ValueError, match="needs --model=ONE post_train.py out_dir"):
        evaluate.main(["--task=export_hf", f"--model={out},{out}", f"--out={hf_dir}"])
    # downstream.py on its own: the same folder, its own run record; the scoring tasks are evaluate.py's
    alone = downstream.main(["--task=export_hf", f"--model={out}", f"--out={tmp_path / 'hf2'}"])
    assert alone["family"] == "clip" and alone["max_relative_difference"] == res["max_relative_difference"]
    assert json.loads((tmp_path / "hf2" / "run_downstream.json").read_text())["script"] == "downstream.py"
    assert (tmp_path / "hf2" / "model.safetensors").read_bytes() == (hf_dir / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"downstream.py runs linear_probe or export_hf \(retrieval, classify"):
        downstream.main(["--task=retrieval"])


# --- linear probe

def shapes_folders(root, n_train, n_val):
    """Synthetic shapes as ImageNet-style folders, class = main object's colour_shape ("a red circle")."""
    for split, n in (("train", n_train), ("val", n_val)):
        recs = make_synthetic_dataset(str(root / "src"), n, seed=3, image_size=32, split=split)
        for r in recs:
            cls = r["captions"][0].removeprefix("a ").replace(" ", "_")
            os.makedirs(root / split / cls, exist_ok=True)
            os.replace(root / "src" / r["image"], root / split / cls / os.path.basename(r["image"]))
    for cls in set(os.listdir(root / "train")) ^ set(os.listdir(root / "val")):  # a class one split lacks: empty folder
        os.makedirs(root / "train" / cls, exist_ok=True), os.makedirs(root / "val" / cls, exist_ok=True)
    return sorted(os.listdir(root / "train"))


def post_trained(tmp_path, steps):
    """A real stage-2 run of the tiny CPU preset (tiny LLM's cache, synthetic shapes): the tower before
    (0 steps: the export of the untrained model) and after post-training."""
    import embed_captions
    import pipeline
    import post_train
    from data import synthetic_vocabulary
    make_synthetic_dataset(str(tmp_path / "pt"), 256, seed=0, image_size=32, split="train")
    llm = pipeline.build_tiny_text_model(str(tmp_path / "llm"), texts=[" ".join(synthetic_vocabulary())] * 8)
    manifest = str(tmp_path / "pt" / "train.jsonl")
    embed_captions.main([f"--text_model={llm}", f"--manifest={manifest}", f"--out_dir={tmp_path / 'cache'}"])
    outs = []
    for n in (0, steps):
        outs.append(str(tmp_path / f"post{n}"))
        post_train.main([os.path.join(ROOT, "config", "post_tiny_cpu.py"), f"--train_manifest={manifest}",
                         f"--cache_dir={tmp_path / 'cache'}", "--val_manifest=", f"--out_dir={outs[-1]}", "--num_workers=0",
                         "--batch_size=32", "--warmup_steps=10", f"--max_steps={n}", "--log_interval=50",
                         "--save_interval=1000"])
    return outs


def test_linear_probe_before_and_after_post_training_with_cached_features(tmp_path, tiny_clip, monkeypatch, capsys):
    root = tmp_path / "shapes"
    classes = shapes_folders(root, 360, 120)
    before, after = post_trained(tmp_path, 150)
    calls = []
    real_encode = zoo.encode_images
    monkeypatch.setattr(zoo, "encode_images", lambda m, paths, *a: calls.append(len(paths)) or real_encode(m, paths, *a))
    monkeypatch.setattr(downstream, "PROBE_CHUNK", 100)
    capsys.readouterr()
    args = ["--task=linear_probe", f"--model={tiny_clip},{before},{after}", f"--data={root}", "--num_workers=0",
            f"--feature_dir={tmp_path / 'feats'}", f"--out={tmp_path / 'probe.json'}", "--probe_batch_size=128"]
    first = evaluate.main(args)
    assert sorted(calls) == sorted([100, 100, 100, 60, 100, 20] * 3)  # 360 train + 120 val, chunks of 100
    printed = capsys.readouterr().out
    chance = 100 / len(classes)
    assert f"{len(classes)} classes (chance top-1 {chance:.2f}%)" in printed and len(classes) == 30
    for spec in (tiny_clip, before, after):  # the HF baseline, the tower before and after post-training
        r = first[spec]
        assert r["top1"] > 2 * chance and r["top5"] >= r["top1"], (spec, r, chance)
        assert re.search(rf"\| {re.escape(spec)} \| {r['top1']:.2f} \| {r['top5']:.2f} \|", printed)
    assert json.loads((tmp_path / "probe.json").read_text())["results"] == first
    calls.clear()
    assert evaluate.main(args) == first and calls == []  # every chunk reused, the same numbers
    printed = capsys.readouterr().out
    assert printed.count("4 of 4 chunks reused") == printed.count("2 of 2 chunks reused") == 3
    feats = sorted(glob.glob(str(tmp_path / "feats" / "post150-*" / "train" / "chunk_*.pt")))
    os.remove(feats[1])  # a run killed mid-way: only the missing chunk is computed again
    assert evaluate.main(args) == first and calls == [100]
    assert os.path.isfile(feats[1])
    with pytest.raises(DataError, match=r"meta.json: cached features were made with different images, count"):
        downstream.cached_features(downstream.load_image_model(after, "cpu"), after, ["x.png"],
                                   os.path.dirname(feats[0]), {}, (False, 0, 1, "cpu"), print)


def test_train_linear_probe_recipe_learns_a_separable_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g) * 5 + 100  # offset and scale: standardisation makes lr 0.1 work anyway
    w = torch.randn(8, 4, generator=g)
    y = ((x - 100) @ w).argmax(1)
    predict = downstream.train_linear_probe(x[:500], y[:500], 4, epochs=50, batch_size=64)
    assert (predict(x[500:]).argmax(1) == y[500:]).float().mean() > 0.9


# --- multilingual converters

XM3600 = [{"image/key": "0001", "en": {"caption": ["a red square", "red"]}, "de": {"caption": ["ein rotes Quadrat"]}},
          {"image/key": "0002", "en": {"caption": ["a blue square"]}, "de": {"caption": ["ein blaues Quadrat", "blau"]}}]


def test_convert_xm3600(tmp_path):
    src = tmp_path / "captions.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in XM3600))
    assert downstream.convert_xm3600(str(src), "de") == [
        {"image": "images/0001.jpg", "captions": ["ein rotes Quadrat"]},
        {"image": "images/0002.jpg", "captions": ["ein blaues Quadrat", "blau"]}]
    with pytest.raises(DataError, match=r"captions.jsonl:1: image 0001 has no 'fr' captions; languages here: de, en"):
        downstream.convert_xm3600(str(src), "fr")
    with pytest.raises(DataError, match=r"captions.jsonl:1: pick the captions' language with --lang; languages here: de, en"):
        downstream.convert_xm3600(str(src), "")
    src.write_text(json.dumps({"image/key": "0003", "en": {"caption": [""]}}) + "\n")
    with pytest.raises(DataError, match=r"captions.jsonl:1: en.caption of image 0003 must be a non-empty list"):
        downstream.convert_xm3600(str(src), "en")


def test_convert_coco_cn(tmp_path):
    (tmp_path / "coco-cn_test.txt").write_text("COCO_val2014_000000000042\nCOCO_train2014_000000000009\n")
    (tmp_path / "imageid.human-written-caption.txt").write_text(
        "COCO_train2014_000000000009#0\t一盘食物\nCOCO_val2014_000000000042#0\t一只狗\nCOCO_val2014_000000000042#1\t草地上的狗\n"
        "COCO_val2014_000000000073#0\t不在测试集\n", encoding="utf-8")
    (tmp_path / "imageid.manually-translated-caption.txt").write_text(
        "COCO_val2014_000000000042#0\t一只黑狗\n", encoding="utf-8")
    assert downstream.convert_coco_cn(str(tmp_path)) == [
        {"image": "val2014/COCO_val2014_000000000042.jpg", "captions": ["一只狗", "草地上的狗"]},
        {"image": "train2014/COCO_train2014_000000000009.jpg", "captions": ["一盘食物"]}]
    with pytest.raises(DataError, match=r"coco-cn_test.txt:2: image COCO_train2014_000000000009 has no caption "
                                        r"in imageid.manually-translated-caption.txt"):
        downstream.convert_coco_cn(str(tmp_path), lang="zh-translated")
    with pytest.raises(ValueError, match="coco_cn --lang='en': expected one of zh, zh-translated"):
        downstream.convert_coco_cn(str(tmp_path), lang="en")
    with pytest.raises(DataError, match="coco-cn_val.txt: not found"):
        downstream.convert_coco_cn(str(tmp_path), split="val")


def test_convert_flickr30k_cn(tmp_path):
    src = tmp_path / "flickr30k_cn_test.txt"
    src.write_text("1000092795.jpg#zhb#0 两个年轻人在院子里\n1000092795.jpg#zhb#1 两个男人\n"
                   "10002456.jpg#zhb#0 几个工人\n", encoding="utf-8")
    assert downstream.convert_flickr30k_cn(str(src)) == [
        {"image": "flickr30k-images/1000092795.jpg", "captions": ["两个年轻人在院子里", "两个男人"]},
        {"image": "flickr30k-images/10002456.jpg", "captions": ["几个工人"]}]
    src.write_text("1000092795.jpg#0\t两个年轻人\n1000092795\t没有编号\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"flickr30k_cn_test.txt:2: expected '<image>#<n>' then a caption"):
        downstream.convert_flickr30k_cn(str(src))


def test_converted_xm3600_end_to_end_retrieval(tmp_path, monkeypatch):
    """convert -> manifest -> evaluate.py retrieval with a perfect colour model: 100 everywhere means
    every converted caption stayed with its image (1-2 captions per image)."""
    import sys
    import types
    from test_evaluate_e2e import ColorImageEncoder, ColorTextEncoder
    rows = [{"image/key": k, "en": {"caption": caps}, "de": {"caption": ["ein Bild"]}} for k, caps in
            (("r", ["a red square", "red"]), ("g", ["green"]), ("b", ["a blue picture", "blue color"]))]
    (tmp_path / "images").mkdir()
    for k, rgb in (("r", (255, 0, 0)), ("g", (0, 255, 0)), ("b", (0, 0, 255))):
        Image.new("RGB", (40, 30), rgb).save(tmp_path / "images" / f"{k}.jpg", quality=95)
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = tmp_path / "manifest.jsonl"
    assert evaluate.main(["--task=convert", "--format=xm3600", "--lang=en", f"--src={tmp_path / 'captions.jsonl'}",
                          f"--out={manifest}"]) == 3
    llm = tmp_path / "llm2clip"
    llm.mkdir()
    (llm / "llm2clip.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "model", types.SimpleNamespace(
        load_llm2clip=lambda path, device="cpu": (ColorImageEncoder(), ColorTextEncoder()),
        read_llm2clip_config=M.read_llm2clip_config))
    res = evaluate.main([f"--model={llm}", f"--data={manifest}", "--num_workers=0"])["results"][str(llm)][tmp_path.name]
    assert (res["n_images"], res["n_texts"]) == (3, 5)
    assert all(v == 100.0 for k, v in res.items() if "@" in k)
