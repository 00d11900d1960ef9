"""evaluate.py end to end: a tiny random CLIPModel (baseline) and an LLM2CLIP out_dir side by side,
zero-shot classification, torchrun, and the real COCO images in shared/data (skipped when absent)."""
import json
import os
import re
import subprocess
import sys
import types

import pytest
from conftest import find_shared_data
import torch
import torch.nn.functional as F
from PIL import Image

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)
import data  # noqa: E402
import evaluate  # noqa: E402
import zoo  # noqa: E402

EVAL_DEFAULTS = {k: getattr(evaluate, k) for k in evaluate.config_keys}


torch.set_num_threads(1)
COLORS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0), "white": (1, 1, 1)}
WORDS = ("a an the of on in with and is are to at photo picture image solid square colored color red green "
         "blue yellow white man woman girl boy dog cat table chair candle street motorcycle sheep sitting next "
         "young little small large black wooden").split()


shared_data_dir = find_shared_data  # shared/data beside or above the repo; None when absent


# --- a stand-in for model.load_llm2clip: a "perfect" colour model, so correct plumbing scores 100

class ColorImageEncoder(torch.nn.Module):
    data_config = {"input_size": (3, 24, 24), "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
                   "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}

    def forward(self, images):  # (B, 3, H, W) -> (B, 3): the mean colour, unnormalised
        mean, std = torch.tensor(self.data_config["mean"]), torch.tensor(self.data_config["std"])
        return F.normalize(images.mean((2, 3)) * std + mean, dim=-1)


class ColorTextEncoder:
    def __init__(self):
        self.batch_sizes = []

    def encode(self, texts, batch_size=64):
        self.batch_sizes.append((len(texts), batch_size))
        out = torch.full((len(texts), 3), 1e-3)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i] += torch.tensor(COLORS.get(w, (0, 0, 0)), dtype=torch.float)
        return F.normalize(out, dim=-1)


@pytest.fixture
def fake_llm2clip(tmp_path, monkeypatch):
    out_dir = tmp_path / "llm2clip_out"
    out_dir.mkdir()
    (out_dir / "llm2clip.json").write_text("{}")
    text_encoder = ColorTextEncoder()
    calls = []

    def load_llm2clip(path, device="cpu"):
        calls.append((path, device))
        return ColorImageEncoder(), text_encoder
    import model  # the stand-in keeps the real llm2clip.json reader
    monkeypatch.setitem(sys.modules, "model", types.SimpleNamespace(load_llm2clip=load_llm2clip,
                                                                     read_llm2clip_config=model.read_llm2clip_config))
    return str(out_dir), calls, text_encoder


def color_manifest(tmp_path, name, per_image):
    """One solid image per colour (odd sizes, so resize + crop run), `per_image` captions naming it."""
    rows = []
    for c, rgb in COLORS.items():
        Image.new("RGB", (37, 29), tuple(255 * v for v in rgb)).save(tmp_path / f"{c}.png")
        caps = [f"a {c} square", f"{c} color", f"the picture is {c}", f"solid {c} image", f"{c}"][:per_image]
        rows.append({"image": f"{c}.png", "captions": caps} if per_image > 1 else
                    {"image": f"{c}.png", "long_captions": [f"a large image that is colored {c} on all of it"]})
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def parse_table(text):
    """The markdown table in printed output -> {row name: [floats]} and the header."""
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = [float(c) for c in cells[1:]]
    return head, rows


def test_baseline_and_llm2clip_side_by_side(tmp_path, tiny_clip, fake_llm2clip, capsys):
    llm_dir, calls, text_encoder = fake_llm2clip
    short, long = color_manifest(tmp_path, "colors5", 5), color_manifest(tmp_path, "colors1", 1)
    out = tmp_path / "results.json"
    payload = evaluate.main([f"--model={tiny_clip},{llm_dir}", f"--data={short},{long}", f"--out={out}",
                             "--num_workers=0", "--batch_size=3", "--text_batch_size=4"])
    printed = capsys.readouterr().out
    assert calls == [(llm_dir, "cpu")]
    assert all(n == b for n, b in text_encoder.batch_sizes) and max(n for n, _ in text_encoder.batch_sizes) == 4
    saved = json.loads(out.read_text())
    assert saved["results"] == payload["results"] and saved["config"]["model"] == f"{tiny_clip},{llm_dir}"
    assert saved["code_version"] and saved["datasets"]["colors1"]["field"] == "long_captions"
    # the perfect colour model scores 100 everywhere: images and captions stay aligned through
    # length-sorted text batches, image batches of 3 and the 5-captions-per-image mapping
    res = saved["results"][llm_dir]
    assert res["colors5"]["n_images"] == 5 and res["colors5"]["n_texts"] == 25 and res["colors1"]["n_texts"] == 5
    assert all(v == 100.0 for d in res.values() for k, v in d.items() if "@" in k)
    base = saved["results"][tiny_clip]
    for d in base.values():
        for x in ("i2t", "t2i"):
            assert 0 <= d[f"{x}_R@1"] <= d[f"{x}_R@5"] <= d[f"{x}_R@10"] <= 100.0
        assert d["t2i_R@5"] == 100.0  # only 5 images: every caption finds its image in the top 5
    # one table: rows = models, columns = dataset I2T/T2I R@1 and their average, the same numbers as the JSON
    head, rows = parse_table(printed)
    assert head == ["model", "colors5 I2T", "colors5 T2I", "colors1 I2T", "colors1 T2I", "avg"]
    assert list(rows) == [tiny_clip, llm_dir] and saved["table"] in printed
    for name, vals in rows.items():
        want = [saved["results"][name][d][f"{x}_R@1"] for d in ("colors5", "colors1") for x in ("i2t", "t2i")]
        assert vals == pytest.approx([round(v, 1) for v in want] + [round(sum(want) / 4, 1)], abs=0.051)


def test_batched_encoding_equals_one_at_a_time(tmp_path, tiny_clip):
    """Length-sorted text batches and image batches give the features of one-by-one encoding, in order."""
    from transformers import AutoTokenizer, CLIPModel
    m = zoo.load_model(tiny_clip, "cpu")
    assert m.data_config == {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
                             "mean": pytest.approx((0.48145466, 0.4578275, 0.40821073)),
                             "std": pytest.approx((0.26862954, 0.26130258, 0.27577711))}
    texts = ["a red square", "the dog", "a young girl sitting next to a wooden table with a candle", "cat", "blue"]
    cfg = {**EVAL_DEFAULTS, "text_batch_size": 2, "batch_size": 3, "num_workers": 0}
    got = zoo.encode_texts(m, texts, cfg, (False, 0, 1, "cpu"))
    model, tok = CLIPModel.from_pretrained(tiny_clip).eval(), AutoTokenizer.from_pretrained(tiny_clip)
    with torch.no_grad():
        want = torch.cat([model.get_text_features(**tok([t], return_tensors="pt")).pooler_output for t in texts])
        assert torch.allclose(got, F.normalize(want, dim=-1), atol=1e-5)
        paths = [color_manifest(tmp_path, "c", 5) and str(tmp_path / f"{c}.png") for c in COLORS]
        got = zoo.encode_images(m, paths, cfg, (False, 0, 1, "cpu"))
        tf = data.eval_transform(m.data_config)
        x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
        want = torch.cat([model.get_image_features(pixel_values=x[i:i + 1]).pooler_output for i in range(len(paths))])
    assert torch.allclose(got, F.normalize(want, dim=-1), atol=1e-5)


def test_hf_preprocessing_mapped_to_our_rules_matches_clip_processor(tiny_clip):
    """Our transform from the CLIP processor's config ~= the HF CLIPImageProcessor on the same image."""
    from transformers import AutoImageProcessor
    proc = AutoImageProcessor.from_pretrained(tiny_clip)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 45), torch.linspace(0, 1, 70), indexing="ij")
    arr = (torch.stack([xx, yy, xx * yy], -1) * 255).round().to(torch.uint8).numpy()  # smooth 70x45 image
    im = Image.fromarray(arr)
    ours = data.eval_transform(zoo.hf_data_config(proc))(im)
    theirs = proc(images=im, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 32, 32)
    assert (ours - theirs).abs().mean() < 0.02  # resampler details differ slightly, geometry must not


def test_siglip_processor_maps_to_short_side_center_crop():
    proc = types.SimpleNamespace(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                 do_center_crop=None)
    assert zoo.hf_data_config(proc) == {"input_size": (3, 384, 384), "interpolation": "bicubic", "crop_pct": 1.0,
                                             "crop_mode": "center", "mean": (0.5,) * 3, "std": (0.5,) * 3}


def test_zero_shot_classification(tmp_path, tiny_clip, fake_llm2clip):
    llm_dir = fake_llm2clip[0]
    root = tmp_path / "imagenet_val"
    for i, c in enumerate(("n01_blue", "n02_green", "n03_red")):
        (root / c).mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (30 + j, 20), tuple(255 * v for v in COLORS[c.split("_")[1]])).save(root / c / f"{j}.JPEG")
    (tmp_path / "names.txt").write_text("blue\ngreen\nred\n")
    (tmp_path / "templates.txt").write_text("a photo of a {} thing.\n{}\n")
    out = tmp_path / "cls.json"
    res = evaluate.main(["--task=classify", f"--model={tiny_clip},{llm_dir}", f"--data={root}", "--num_workers=0",
                         f"--classnames={tmp_path / 'names.txt'}", f"--templates={tmp_path / 'templates.txt'}",
                         f"--out={out}"])
    assert res[llm_dir] == {"top1": 100.0, "top5": 100.0, "n": 6}
    assert res[tiny_clip]["top1"] in {0.0, 100 / 6, 200 / 6, 50.0, 400 / 6, 500 / 6, 100.0}
    assert res[tiny_clip]["top5"] == 100.0  # 3 classes
    assert json.loads(out.read_text())["results"] == res
    (tmp_path / "names.txt").write_text("blue\ngreen\n")
    with pytest.raises(data.DataError, match="names.txt: 2 class names, but .*imagenet_val has 3 class folders"):
        evaluate.main(["--task=classify", f"--model={llm_dir}", f"--data={root}",
                       f"--classnames={tmp_path / 'names.txt'}"])


def test_missing_image_fails_before_any_model_loads(tmp_path, fake_llm2clip):
    m = color_manifest(tmp_path, "colors5", 5)
    os.remove(tmp_path / "blue.png")
    with pytest.raises(data.DataError, match=r"colors5.jsonl:3: image file not found: .*blue.png"):
        evaluate.main([f"--model={fake_llm2clip[0]}", f"--data={m}"])
    assert fake_llm2clip[1] == []


DRIVER = """
import sys, types
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
import test_evaluate_e2e as t, evaluate

import model
sys.modules["model"] = types.SimpleNamespace(load_llm2clip=lambda path, device: (t.ColorImageEncoder(), t.ColorTextEncoder()),
                                             read_llm2clip_config=model.read_llm2clip_config)
evaluate.main(sys.argv[1:])
"""


def test_torchrun_two_ranks(tmp_path):
    """Under torchrun (gloo), ranks take uneven shards (5 images, 25 captions), gather, rank 0 scores:
    the perfect colour model still scores 100, so every feature came back in its place."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "llm2clip.json").write_text("{}")
    (tmp_path / "driver.py").write_text(DRIVER.format(repo=os.path.abspath(REPO), tests=os.path.dirname(__file__)))
    out = tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        str(tmp_path / "driver.py"), f"--model={tmp_path / 'out'}", "--num_workers=0",
                        f"--data={color_manifest(tmp_path, 'colors5', 5)}", "--batch_size=2", "--text_batch_size=4",
                        f"--out={out}"], capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("| model |") == 1  # only rank 0 prints the table
    res = json.loads(out.read_text())["results"][str(tmp_path / "out")]["colors5"]
    assert (res["n_images"], res["n_texts"]) == (5, 25)
    assert all(v == 100.0 for k, v in res.items() if "@" in k)


def test_real_coco6_end_to_end(tmp_path, tiny_clip, capsys):
    shared = shared_data_dir()
    manifest = shared and os.path.join(shared, "images", "coco6", "manifest.jsonl")
    if not manifest or not os.path.isfile(manifest):
        pytest.skip("shared/data/images/coco6 not found")
    out = tmp_path / "coco6.json"
    evaluate.main([f"--model={tiny_clip}", f"--data={manifest}", "--captions_per_image=5", "--num_workers=0",
                   f"--out={out}"])
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    r = saved["results"][tiny_clip]["coco6"]  # <folder>/manifest.jsonl is named after its folder
    assert (r["n_images"], r["n_texts"]) == (6, 30)
    for x in ("i2t", "t2i"):
        assert 0 <= r[f"{x}_R@1"] <= r[f"{x}_R@5"] <= r[f"{x}_R@10"] <= 100
        assert all(round(r[f"{x}_R@{k}"] * (6 if x == "i2t" else 30) / 100, 6).is_integer() for k in (1, 5, 10))
    assert r["t2i_R@10"] == 100.0  # only 6 images
    head, rows = parse_table(printed)
    assert head == ["model", "coco6 I2T", "coco6 T2I", "avg"]
    assert rows[tiny_clip] == pytest.approx([round(r["i2t_R@1"], 1), round(r["t2i_R@1"], 1),
                                             round((r["i2t_R@1"] + r["t2i_R@1"]) / 2, 1)], abs=0.051)
    assert re.search(r"coco6: 6 images, 30 texts \(captions, 5 per image\)", printed)


def test_tiny_siglip_baseline(tmp_path):
    """SiglipModel goes through the same interface: max-length padding, processor mapped to our rules."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipImageProcessor, SiglipModel
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    d = str(tmp_path / "siglip")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",  # like SiglipTokenizer:
                            model_input_names=["input_ids"]).save_pretrained(d)     # no attention mask
    torch.manual_seed(0)
    SiglipModel(SiglipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8))).save_pretrained(d)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
    m = zoo.load_model(d, "cpu")
    assert (m.siglip, m.max_length, m.data_config["crop_pct"], m.data_config["mean"]) == (True, 16, 1.0, (0.5, 0.5, 0.5))
    texts = ["a red square", "the dog is sitting next to a wooden table"]
    got = zoo.encode_texts(m, texts, {**EVAL_DEFAULTS, "text_batch_size": 2}, (False, 0, 1, "cpu"))
    model = SiglipModel.from_pretrained(d).eval()
    ids = torch.tensor([[vocab[w] for w in t.split()] + [0] * (16 - len(t.split())) for t in texts])
    with torch.no_grad():
        want = F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
    assert torch.allclose(got, want, atol=1e-5)
    res = evaluate.main([f"--model={d}", f"--data={color_manifest(tmp_path, 'colors1', 1)}", "--num_workers=0"])
    assert res["results"][d]["colors1"]["n_images"] == 5


def test_duplicate_dataset_names_and_variable_size_processor(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for folder in (a, b):
        color_manifest(folder, "manifest", 5)
    assert evaluate.resolve_dataset(str(a / "manifest.jsonl"), dict(EVAL_DEFAULTS))["name"] == "a"
    with pytest.raises(ValueError, match="duplicate entries .*dataset names: a, a"):
        evaluate.main(["--model=x", f"--data={a / 'manifest.jsonl'},{a / 'manifest.jsonl'}"])
    with pytest.raises(ValueError, match="duplicate entries in --model=x,x"):
        evaluate.main(["--model=x,x", f"--data={a / 'manifest.jsonl'},{b / 'manifest.jsonl'}"])
    naflex = types.SimpleNamespace(size=None, max_num_patches=256, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    with pytest.raises(ValueError, match="no fixed input size; variable-resolution"):
        zoo.hf_data_config(naflex)
