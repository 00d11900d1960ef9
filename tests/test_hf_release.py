"""Side by side with the released LLM2CLIP models: `evaluate.py --model=hf_llm2clip:PATH` on a tiny stand-in of a
release (a remote-code folder written here) against a computation by hand, and `--task=export_llm2clip` (our
out_dir as such a folder) loaded back by AutoModel in a fresh process."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import ROOT
import common
import evaluate
import hf_release
import model as M

torch.set_num_threads(1)

# a stand-in of a released model (microsoft/LLM2CLIP-Openai-*: CLIP's vision tower + projection, a text adaptor over
# the stage-1 embeddings), with the interface code written for them uses
STANDIN_CONFIG = '''
from transformers import PretrainedConfig


class StandInConfig(PretrainedConfig):
    model_type = "llm2clip_standin"

    def __init__(self, vision_config=None, projection_dim=8, text_dim=32, **kwargs):
        self.vision_config, self.projection_dim, self.text_dim = dict(vision_config or {}), projection_dim, text_dim
        super().__init__(**kwargs)
'''
STANDIN_MODEL = '''
import torch.nn as nn
from transformers import CLIPVisionConfig, CLIPVisionModel, PreTrainedModel

from .configuration_standin import StandInConfig


class StandInLLM2CLIP(PreTrainedModel):
    config_class = StandInConfig

    def __init__(self, config):
        super().__init__(config)
        vision = CLIPVisionConfig(**config.vision_config)
        self.vision_model = CLIPVisionModel(vision)
        self.visual_projection = nn.Linear(vision.hidden_size, config.projection_dim, bias=False)
        self.text_adaptor = nn.Linear(config.text_dim, config.projection_dim)
        self.post_init()

    def get_image_features(self, pixel_values):
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)

    def get_text_features(self, inputs):
        return self.text_adaptor(inputs)
'''


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    from transformers import AutoConfig, AutoModel
    d = tmp_path_factory.mktemp("LLM2CLIP-standin")
    (d / "configuration_standin.py").write_text(STANDIN_CONFIG)
    (d / "modeling_standin.py").write_text(STANDIN_MODEL)
    (d / "config.json").write_text(json.dumps({
        "model_type": "llm2clip_standin", "architectures": ["StandInLLM2CLIP"], "projection_dim": 8, "text_dim": 32,
        "auto_map": {"AutoConfig": "configuration_standin.StandInConfig", "AutoModel": "modeling_standin.StandInLLM2CLIP"},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                          "image_size": 32, "patch_size": 8}}))
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(str(d), trust_remote_code=True), trust_remote_code=True
                          ).save_pretrained(str(d))  # random weights; no preprocessor_config.json, as released
    return str(d)


def noise_manifest(d, n, size):
    """n random-noise images (distinct, no two alike) with one caption each (1:1, as the long-caption sets)."""
    rng = np.random.default_rng(0)
    words = "red green blue small large circle square dog cat on a the table".split()
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(d / f"{i}.png")
        rows.append({"image": f"{i}.png", "long_captions": [" ".join(rng.choice(words, 6))]})
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d / "m.jsonl"), [str(d / r["image"]) for r in rows], [r["long_captions"][0] for r in rows]


def recalls_by_hand(img, txt):
    """1:1 retrieval by hand: the rank of the true partner of each image / text; R@k = % with rank < k."""
    sim = img @ txt.T
    i2t = (sim > sim.diag()[:, None]).sum(1)
    t2i = (sim.T > sim.diag()[:, None]).sum(1)
    return {f"{d}_R@{k}": 100.0 * (r < k).float().mean().item() for d, r in (("i2t", i2t), ("t2i", t2i)) for k in (1, 5)}


def test_released_style_model_scores_beside_a_baseline_as_computed_by_hand(tmp_path, standin, tiny_clip, tiny_models):
    from transformers import AutoModel, CLIPImageProcessor
    llm = tiny_models("llama")
    manifest, paths, texts = noise_manifest(tmp_path, 12, (32, 32))  # 32 px: the processor's size, no resize
    spec = f"hf_llm2clip:{standin}"
    args = [f"--model={tiny_clip},{spec}", f"--data={manifest}", "--trust_remote_code=True", f"--text_model={llm}",
            "--chat_template=none", f"--image_processor={tiny_clip}", "--num_workers=0", f"--out={tmp_path / 'r.json'}"]
    got = evaluate.main(args)["results"]
    assert set(got) == {tiny_clip, spec}  # one table, the baseline beside the released-style model
    # by hand: the folder through AutoModel, the images through its CLIP image processor, the captions through
    # the stage-1 encoder's pooled output with the official extraction's settings (no chat tokens in this tokenizer)
    model = AutoModel.from_pretrained(standin, trust_remote_code=True).eval()
    proc = CLIPImageProcessor.from_pretrained(tiny_clip)
    enc = M.load_text_encoder(llm, bidirectional=True, pooling="mean", chat_template="none", official_extraction=True)
    with torch.no_grad():
        pixels = proc([Image.open(p) for p in paths], return_tensors="pt").pixel_values
        img = F.normalize(model.get_image_features(pixels), dim=-1)
        txt = F.normalize(model.get_text_features(enc.encode(texts, None, 512)), dim=-1)
    want = recalls_by_hand(img, txt)
    row = got[spec]["m"]
    assert {k: row[k] for k in want} == pytest.approx(want, abs=1e-6), (row, want)
    assert 0 < want["i2t_R@5"] < 100 and row["n_images"] == row["n_texts"] == 12
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["config"]["trust_remote_code"] is True and spec in saved["table"]


def test_remote_code_needs_the_flag_and_a_processor(tmp_path, standin, capsys, monkeypatch):
    manifest, _, _ = noise_manifest(tmp_path, 2, (8, 8))
    monkeypatch.setattr(sys, "argv", ["evaluate.py"])
    with pytest.raises(SystemExit) as e:  # before anything is loaded: exit 2, one line naming the flag
        common.run_main(evaluate.main, [f"--model=hf_llm2clip:{standin}", f"--data={manifest}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--trust_remote_code=True" in err
    assert err.startswith("evaluate.py: error: model=hf_llm2clip:")
    with pytest.raises(ValueError, match=r"no preprocessor_config.json: pass --image_processor=NAME"):
        evaluate.main([f"--model=hf_llm2clip:{standin}", f"--data={manifest}", "--trust_remote_code=True"])


RELOAD = '''
import sys, torch
from transformers import AutoModel, CLIPImageProcessor
folder, io = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
proc = CLIPImageProcessor.from_pretrained(folder)
x = torch.load(io + "/in.pt")
with torch.no_grad():
    out = {"image": model.get_image_features(x["pixels"]), "text": model.get_text_features(x["embeddings"])}
out.update(size=proc.size["shortest_edge"], crop=proc.crop_size["height"], mean=list(proc.image_mean),
           scale=model.logit_scale.exp().item(), record=model.config.llm2clip_text, kind=type(model).__name__)
torch.save(out, io + "/out.pt")
'''


def test_export_llm2clip_loads_with_automodel_in_a_fresh_process(tmp_path, tiny_llm2clip_run):
    """Our out_dir as a released-style folder: a fresh interpreter (nothing of this repository imported) gives
    get_image_features / get_text_features equal to model.load_llm2clip's encoders, and evaluate.py scores the
    folder (hf_llm2clip:) exactly as the out_dir."""
    out_dir, llm = tiny_llm2clip_run
    folder = tmp_path / "release"
    res = evaluate.main(["--task=export_llm2clip", f"--model={out_dir}", f"--out={folder}"])
    assert res["max_difference"] == 0.0 and sorted(os.listdir(folder)) == sorted(hf_release.FILES + ("run_evaluate.json",))
    image_encoder, text_encoder = M.load_llm2clip(out_dir)
    g = torch.Generator().manual_seed(1)
    pixels, emb = torch.randn(3, 3, 56, 56, generator=g), torch.randn(4, 32, generator=g)
    torch.save({"pixels": pixels, "embeddings": emb}, tmp_path / "in.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    fresh = subprocess.Popen([sys.executable, "-c", RELOAD, str(folder), str(tmp_path)], env=env, cwd=str(tmp_path))
    # meanwhile: the folder, scored through its remote code, is the out_dir's row exactly
    manifest, _, _ = noise_manifest(tmp_path, 10, (61, 47))
    r = evaluate.main([f"--model={out_dir},hf_llm2clip:{folder}", f"--data={manifest}", "--trust_remote_code=True",
                       "--num_workers=0"])["results"]
    assert r[out_dir] == r[f"hf_llm2clip:{folder}"]
    assert fresh.wait(timeout=300) == 0
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    assert got["kind"] == "LLM2CLIPModel"
    with torch.no_grad():
        assert torch.equal(F.normalize(got["image"], dim=-1), image_encoder(pixels))  # bitwise
        assert torch.equal(F.normalize(got["text"], dim=-1), text_encoder.encode_embeddings(emb))
    dc = image_encoder.data_config  # the processor holds our tower's eval preprocessing
    assert (got["size"], got["crop"], tuple(got["mean"])) == (int(56 / dc["crop_pct"]), 56, tuple(dc["mean"]))
    assert got["scale"] == pytest.approx(image_encoder.logit_scale, rel=1e-6)
    assert got["record"]["model"] == llm and got["record"]["max_length"] == 64  # what get_text_features expects
    with pytest.raises(ValueError, match=r"holds files .*--overwrite=True"):
        evaluate.main(["--task=export_llm2clip", f"--model={out_dir}", f"--out={folder}"])


def test_export_llm2clip_refuses_what_get_text_features_cannot_take(tmp_path):
    vision = {"model_name": "vit_base_patch16_clip_224.openai", "file": "vision_tower.pt"}
    cases = {"direct": ({"text_encoders": ["clip_t"]}, r"it trained no LLM side"),
             "transformer": ({"adaptor": {"kind": "transformer"}, "text": {}}, r"adaptor='transformer' reads token states"),
             "lora": ({"adaptor": {"kind": "linear"}, "text": {"lora": "text_lora"}}, r"stage-2 LoRA")}
    for name, (meta, message) in cases.items():
        (tmp_path / name).mkdir()
        M.write_llm2clip_config(str(tmp_path / name), {"vision": vision, **meta})
        with pytest.raises(ValueError, match=message):
            hf_release.load_export(str(tmp_path / name))
    assert os.path.isfile(os.path.join(ROOT, "release_code", "modeling_llm2clip.py"))


def test_export_llm2clip_rebuilds_timm_buffers_of_an_eva02_tower(tmp_path, tiny_llm2clip_run):
    """EVA02's rotary tables and zero key biases are non-persistent buffers (not in the checkpoint), which
    transformers allocates empty: the remote code recomputes them, so the reloaded tower is timm's exactly."""
    import zoo
    _, llm = tiny_llm2clip_run
    torch.manual_seed(0)
    tower = M.VisionTower("eva02_tiny_patch14_224.mim_in22k", embed_dim=24, timm_kwargs=dict(img_size=56, depth=2))
    assert any(n.endswith("pos_embed") for n, _ in tower.model.named_buffers())  # the rotary table
    (tmp_path / "run").mkdir()
    zoo.export(str(tmp_path / "run"), M.LLM2CLIP(tower, text_dim=32, adaptor_blocks=0), {},
               {"model": llm, "pooling": "mean", "instruction": None, "max_length": 64})
    diff, config = hf_release.export_release(str(tmp_path / "run"), str(tmp_path / "release"))
    assert diff == 0.0 and config["vision_model"] == "eva02_tiny_patch14_224.mim_in22k"
