"""A post_train.py out_dir written the way the released LLM2CLIP models are shipped (microsoft/LLM2CLIP-Openai-B-16,
-Openai-L-14-336, ...): a transformers remote-code folder, so code written for those models loads ours unchanged:

    python evaluate.py --task=export_llm2clip --model=out/post --out=hf/post_release
    model = AutoModel.from_pretrained("hf/post_release", trust_remote_code=True)
    image_features = model.get_image_features(CLIPImageProcessor.from_pretrained("hf/post_release")(images).pixel_values)
    text_features = model.get_text_features(embeddings)   # the stage-1 encoder's pooled output, made as config.json says

The folder (FILES): config.json (auto_map to the two code files, the timm tower's name and kwargs, the adaptor's
shape, the logit scale (and bias), and `llm2clip_text`: the stage-1 encoder and the settings its embeddings must be made
with), configuration_llm2clip.py and modeling_llm2clip.py (copied from release_code/: torch, transformers and timm
only), model.safetensors (`vision.*`: the timm state dict, `text_adaptor.*`: model.Adaptor's, `logit_scale`), and
preprocessor_config.json (a CLIPImageProcessor with the tower's eval preprocessing, as export_hf writes it).
The reader is zoo.ReleasedLLM2CLIP (`evaluate.py --model=hf_llm2clip:FOLDER`), which scores released folders too.

A module of its own so downstream.py keeps the vision-only export and the probe; downstream.py and evaluate.py run
this as `--task=export_llm2clip`.
"""
import json
import os
import shutil

import torch
import torch.nn.functional as F

import common
import model as M
import zoo

CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "release_code")
CODE_FILES = ("configuration_llm2clip.py", "modeling_llm2clip.py")
FILES = ("config.json", "model.safetensors", "preprocessor_config.json") + CODE_FILES
MODEL_TYPE = "llm2clip_timm"  # ours: transformers never takes the folder for one of its CLIP classes


def release_config(meta, image_encoder, adaptor):
    """config.json of the folder, from the out_dir's llm2clip.json and its loaded parts."""
    v, t = meta["vision"], meta["text"]
    return {"architectures": ["LLM2CLIPModel"], "model_type": MODEL_TYPE,
            "auto_map": {"AutoConfig": "configuration_llm2clip.LLM2CLIPConfig",
                         "AutoModel": "modeling_llm2clip.LLM2CLIPModel"},
            "vision_model": v["model_name"], "timm_kwargs": v.get("timm_kwargs", {}),
            "embed_dim": adaptor.out_dim, "text_dim": adaptor.in_dim, "adaptor_blocks": adaptor.num_blocks,
            "adaptor_expansion": adaptor.expansion, "logit_scale": float(image_encoder.logit_scale or 100.0),
            "logit_bias": meta.get("logit_bias"),
            "llm2clip_text": {k: t.get(k) for k in ("model",) + zoo.TEXT_KEYS + ("fingerprint",)},
            "dtype": "float32", "code_version": meta.get("code_version")}


def load_export(out_dir):
    """(llm2clip.json, ImageEncoder, Adaptor) of a post_train.py out_dir, refusing what get_text_features(embeddings)
    cannot express: no LLM side, a token-level adaptor, or a stage-2 LoRA (it changed the LLM itself)."""
    meta = M.read_llm2clip_config(out_dir)
    a, t = meta.get("adaptor"), meta.get("text") or {}
    why = ("it trained no LLM side (losses='direct')" if a is None else
           "its adaptor='transformer' reads token states, not pooled embeddings" if a.get("kind", "linear") != "linear" else
           "its stage-2 LoRA (text_lora/) changed the LLM, so no stage-1 embedding feeds it" if t.get("lora") else None)
    if why:
        raise ValueError(f"{out_dir}: cannot be written as a released-style LLM2CLIP folder: {why}; expected a run "
                         "with the default linear adaptor over cached (or online, frozen) stage-1 embeddings")
    image_encoder, _ = M.load_llm2clip(out_dir, load_text=False)
    adaptor = M.build_adaptor("linear", a["in_dim"], a["out_dim"], a["num_blocks"], a["expansion"])
    adaptor.load_state_dict(M._load_state(os.path.join(out_dir, a["file"])))
    return meta, image_encoder, adaptor.eval()


def state_dict(image_encoder, adaptor):
    """The folder's weights under the remote-code model's names (plain float32 copies, no shared storage)."""
    sd = {**{"vision." + k: v for k, v in image_encoder.vision.model.state_dict().items()},
          **{"text_adaptor." + k: v for k, v in adaptor.state_dict().items()}}
    sd["logit_scale"] = torch.tensor(float(image_encoder.logit_scale or 100.0)).log()
    return {k: v.detach().float().contiguous().clone() for k, v in sd.items()}


def remove_release(folder):
    """Delete the files export_release writes (after a failed write or check): never a half export."""
    for n in FILES:
        if os.path.isfile(os.path.join(folder, n)):
            os.remove(os.path.join(folder, n))


@torch.no_grad()
def export_release(out_dir, folder, atol=1e-6):
    """Write out_dir (a post_train.py export) as a remote-code folder (FILES), load it back with
    AutoModel.from_pretrained(folder, trust_remote_code=True) and compare get_image_features /
    get_text_features with model.load_llm2clip's encoders on random inputs (normalised, max absolute
    difference); if they differ by more than atol the files are removed again and RuntimeError says so.
    Returns (the difference, the config written)."""
    from safetensors.torch import save_file
    from transformers import AutoModel
    meta, image_encoder, adaptor = load_export(out_dir)
    processor = zoo.hf_image_processor(image_encoder.data_config)  # a ValueError for non-square / non-centre-crop
    config = common.jsonable(release_config(meta, image_encoder, adaptor))
    os.makedirs(folder, exist_ok=True)
    try:
        for n in CODE_FILES:
            shutil.copyfile(os.path.join(CODE_DIR, n), os.path.join(folder, n))
        save_file(state_dict(image_encoder, adaptor), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        processor.save_pretrained(folder)
        common.atomic_write_text(os.path.join(folder, "config.json"), json.dumps(config, indent=2) + "\n")
    except OSError as e:
        remove_release(folder)
        raise OSError(e.errno, f"cannot write {folder}: {e.strerror or e}") from None
    hf, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
        remove_release(folder)
        raise RuntimeError(f"{folder}: the remote-code model reloaded with {info}; the weight layout is incomplete")
    _, h, w = image_encoder.data_config["input_size"]
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 3, h, w, generator=g), torch.randn(3, adaptor.in_dim, generator=g)
    diff = max((F.normalize(hf.get_image_features(x), dim=-1) - image_encoder(x)).abs().max().item(),
               (F.normalize(hf.get_text_features(emb), dim=-1) - F.normalize(adaptor(emb), dim=-1)).abs().max().item())
    if diff > atol:
        remove_release(folder)
        raise RuntimeError(f"{folder}: the remote-code model differs from {out_dir}'s encoders (max difference "
                           f"{diff:.2e} > {atol}); not a faithful export")
    return diff, config
