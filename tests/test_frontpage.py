"""The README front page's tiny commands, run as a new user runs them: `python pipeline.py` (at toy sizes, in a
fresh folder), then the stage presets as written, MNTP on the pipeline's text model and export_hf on its stage 2."""
import glob
import hashlib
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import loss as L
import model as M
from conftest import ROOT

PRESETS = sorted(glob.glob(os.path.join(ROOT, "config", "*_tiny_cpu.py")))


def tree_digest(folder):
    """sha256 over every file's relative name and bytes under folder: "was it rewritten?"."""
    h = hashlib.sha256()
    for dirpath, dirnames, files in sorted(os.walk(folder)):
        dirnames.sort()
        for n in sorted(files):
            p = os.path.join(dirpath, n)
            h.update(os.path.relpath(p, folder).encode() + b"\0")
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


class Run:
    """The folder `pipeline.py` ran in (cwd while this module's tests run) and what it left in out-tiny/."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """`python pipeline.py` with 64 training images and 2 steps per stage, in an empty folder holding only a
    link to config/: the presets' relative paths resolve there exactly as in a fresh clone. Two stage-2 steps
    learn nothing, so the pipeline's own learning check must stop it, after every stage has written its output."""
    import pipeline
    run = Run()
    run.dir = tmp_path_factory.mktemp("frontpage")
    os.symlink(os.path.join(ROOT, "config"), run.dir / "config")
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(run.dir)
    torch.set_num_threads(1)
    try:
        with pytest.raises(SystemExit, match="did not clearly beat chance and the untrained model"):
            pipeline.main(["--num_train=64", "--num_val=16", "--num_test=16", "--cc_steps=2", "--post_steps=2"])
        run.root = pipeline.out_dir
        run.made = set(os.listdir(run.root))
        run.digests = {n: tree_digest(os.path.join(run.root, n)) for n in ("cc", "post")}
        yield run
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)


def preset_paths(path):
    """The path-valued keys of a preset file: a string holding a '/' or under a path-like key name."""
    scope = {}
    exec(open(path).read(), scope)
    return {k: v for k, v in scope.items() if isinstance(v, str) and v
            and ("/" in v or k == "text_model" or k.endswith(("_dir", "_captions", "_manifest", "_shards", "_index")))}


def test_every_tiny_preset_reads_the_pipelines_files_and_writes_beside_them(tiny):
    assert [os.path.basename(p) for p in PRESETS] == ["cc_tiny_cpu.py", "post_tiny_cpu.py"]
    for path in PRESETS:
        paths = preset_paths(path)
        assert "out_dir" in paths and len(paths) > 1, path
        for key, value in paths.items():
            assert value.startswith(tiny.root + "/"), (path, key, value)
            top = value[len(tiny.root) + 1:].split("/")[0]
            if key == "out_dir":  # a folder of its own: running the preset never replaces a pipeline stage
                assert top not in tiny.made, (path, value)
            else:
                assert os.path.exists(value), (path, key, value)  # written by `python pipeline.py`


def test_mntp_runs_on_the_pipelines_text_model(tiny):
    """`python cc_finetune.py config/cc_tiny_cpu.py --objective=mntp`: the text model is saved with its LM head,
    and its base is the headless model of the same seed (so stage 1's SimCSE and the cache are unchanged)."""
    import cc_finetune
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    text_model = f"{tiny.root}/text_model"
    res = cc_finetune.main(["config/cc_tiny_cpu.py", "--objective=mntp", "--max_steps=2"])
    assert res["steps"] == 2 and math.isfinite(res["final_loss"]) and res["final_loss"] > 0
    meta = json.load(open(f"{tiny.root}/cc_preset/{M.ENCODER_CONFIG}"))
    assert meta["objective"] == "mntp" and meta["base_model"] == text_model
    assert tree_digest(f"{tiny.root}/cc") == tiny.digests["cc"]  # the pipeline's stage 1 is left as it was

    lm, info = AutoModelForCausalLM.from_pretrained(text_model, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"])  # a real causal-LM folder: the head is stored
    base = AutoModel.from_pretrained(text_model)
    head = L.load_lm_head(text_model, base)
    assert torch.equal(head, lm.lm_head.weight) and not torch.equal(head, base.get_input_embeddings().weight)
    torch.manual_seed(0)  # pipeline.py's seed: a model built without the head
    headless = AutoModel.from_config(AutoConfig.from_pretrained(text_model)).state_dict()
    got = base.state_dict()
    assert got.keys() == headless.keys() and all(torch.equal(got[k], headless[k]) for k in got)


def test_stage2_preset_runs_as_written(tiny):
    """`python post_train.py config/post_tiny_cpu.py` (only shorter): it reads the pipeline's manifest and cache,
    scores its val manifest, and writes its own out_dir."""
    import post_train
    res = post_train.main(["config/post_tiny_cpu.py", "--max_steps=2", "--num_workers=0"])
    assert res["step"] == 2 and res["out_dir"] == f"{tiny.root}/post_preset"
    rows = [json.loads(line) for line in open(f"{tiny.root}/post_preset/metrics.jsonl")]
    assert any("eval" in r and r["eval"]["chance_R@1"] == pytest.approx(100 / 16) for r in rows)
    assert tree_digest(f"{tiny.root}/post") == tiny.digests["post"]


def test_export_hf_of_the_pipelines_stage2_gives_our_image_embeddings(tiny):
    """`python evaluate.py --task=export_hf --model=out-tiny/post --out=...`: the folder loads back with
    transformers alone and gives the image embeddings retrieval scores, on the pipeline's test images."""
    import evaluate
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, CLIPVisionModel
    post, hf_dir = f"{tiny.root}/post", f"{tiny.root}/hf"
    res = evaluate.main(["--task=export_hf", f"--model={post}", f"--out={hf_dir}"])
    assert res["family"] == "clip" and res["max_relative_difference"] < 1e-5
    image_encoder, _ = M.load_llm2clip(post, load_text=False)
    tower = CLIPVisionModel.from_pretrained(hf_dir).eval()
    assert (tower.config.image_size, tower.config.patch_size, tower.config.hidden_size) == (32, 8, 64)
    processor = AutoImageProcessor.from_pretrained(hf_dir, backend="pil")
    assert processor.crop_size == {"height": 32, "width": 32}
    assert tuple(processor.image_mean) == tuple(image_encoder.data_config["mean"])

    transform = data.eval_transform(image_encoder.data_config)
    records = data.read_manifest(f"{tiny.root}/data/test.jsonl")
    pixels = torch.stack([transform(Image.open(r["image"]).convert("RGB")) for r in records])
    proj = load_file(f"{hf_dir}/projection.safetensors")
    with torch.no_grad():
        out = tower(pixel_values=pixels, output_hidden_states=True)
        want = image_encoder(pixels)
        raw = image_encoder.vision(pixels)  # before normalising
    got_raw = out.pooler_output @ proj["weight"].T + proj["bias"]
    got = F.normalize(got_raw, dim=-1)
    assert got.shape == want.shape == (16, 64) and torch.allclose(got, want, rtol=0, atol=1e-5)
    # a random tower maps every image near one direction: the part that tells images apart must match too
    spread = raw - raw.mean(0)
    assert spread.abs().max() > 1e-2 and torch.allclose(got_raw - got_raw.mean(0), spread, rtol=0, atol=1e-5)
    assert len(out.hidden_states) == 3  # embeddings + 2 blocks: LLaVA's hidden_states[-2] is block 1


def test_a_second_pipeline_run_replaces_its_own_outputs(tiny):
    """`python pipeline.py` again over its own out-tiny/ (last here: it replaces the stages the tests above read):
    every stage reruns into its folder instead of refusing it, to the same weights and numbers."""
    import pipeline
    weights = f"{tiny.root}/cc/merged/model.safetensors"
    before = (tree_digest(os.path.dirname(weights)), json.load(open(f"{tiny.root}/results.json"))["results"])
    with pytest.raises(SystemExit, match="did not clearly beat chance"):
        pipeline.main(["--num_train=64", "--num_val=16", "--num_test=16", "--cc_steps=2", "--post_steps=2"])
    after = (tree_digest(os.path.dirname(weights)), json.load(open(f"{tiny.root}/results.json"))["results"])
    assert after == before
    assert {"cc_preset", "post_preset", "hf"} <= set(os.listdir(tiny.root))  # the presets' own folders stay
