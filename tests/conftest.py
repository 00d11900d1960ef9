import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def one_thread():
    """Two shared CPU cores: oversubscribed threads make tiny models 10x slower, not faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class World:
    """Paths of a tiny stage-2 set-up (see stage2_world)."""


def stage2_world(d, n_train, n_val):
    """Synthetic train/val manifests, a tiny random LLM and both embedding caches, under folder d."""
    import data
    import embed_captions
    import pipeline
    w = World()
    w.dir = d
    data.make_synthetic_dataset(d / "data", n_train, seed=0, image_size=32, split="train")
    data.make_synthetic_dataset(d / "data", n_val, seed=0, image_size=32, split="val")
    w.train, w.val = str(d / "data" / "train.jsonl"), str(d / "data" / "val.jsonl")
    w.llm = pipeline.build_tiny_text_model(str(d / "llm"), texts=[" ".join(data.synthetic_vocabulary())] * 8)
    for name, manifest in (("cache", w.train), ("val_cache", w.val)):
        embed_captions.main([f"--text_model={w.llm}", f"--manifest={manifest}", f"--out_dir={d / name}"])
    w.cache, w.val_cache = str(d / "cache"), str(d / "val_cache")
    return w


def free_port():
    """A free TCP port, so parallel test runs on one machine do not collide on a rendezvous port."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_shared_data():
    """The shared real-data folder (`shared/data` beside or above the repo), or None."""
    d = ROOT
    while True:
        cand = os.path.join(d, "shared", "data")
        if os.path.isdir(cand):
            return cand
        if os.path.dirname(d) == d:
            return None
        d = os.path.dirname(d)


@pytest.fixture(scope="session")
def shared_data():
    path = find_shared_data()
    if path is None:
        pytest.skip("shared/data not found")
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Build (once per session) tiny random text models, saved as HF folders: arch -> path."""
    import pipeline
    root = tmp_path_factory.mktemp("tiny_models")
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = pipeline.build_tiny_text_model(str(root / arch), arch)
        return cache[arch]
    return get


CLIP_WORDS = ("a an the of on in with and is are to at photo picture image solid square colored color red green "
              "blue yellow white man woman girl boy dog cat table chair candle street motorcycle sheep sitting next "
              "young little small large black wooden circle triangle background").split()


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A random CLIPModel + word-level tokenizer + CLIPImageProcessor in a folder, built offline."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(CLIP_WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    d = str(tmp_path_factory.mktemp("tiny_clip"))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=32).save_pretrained(d)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=32, eos_token_id=1,
                                      pad_token_id=0, bos_token_id=0),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_llm2clip_run(tmp_path_factory, tiny_models):
    """A stage-2 out_dir as post_train.py writes it (zoo.export): a random OpenAI-CLIP-style timm tower (56 px, 2
    blocks, 24-d head) and a 1-block adaptor over the tiny llama's (32-d) embeddings -> (out_dir, text model)."""
    import model as M
    import zoo
    llm = tiny_models("llama")
    torch.manual_seed(0)
    tower = M.VisionTower("vit_base_patch16_clip_224.openai", embed_dim=24,
                          timm_kwargs=dict(img_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=2))
    out = str(tmp_path_factory.mktemp("tiny_llm2clip_run"))
    zoo.export(out, M.LLM2CLIP(tower, text_dim=32, adaptor_blocks=1), {},
               {"model": llm, "bidirectional": True, "pooling": "mean", "chat_template": "", "instruction": None,
                "max_length": 64})
    return out, llm


def overflow_at(monkeypatch, steps):
    """Give the gradients of the n-th optimizer steps (0-based, n in `steps`) an inf, as a float16 overflow
    would; returns the list of calls so far. Patches common.scaled_step, which both training stages step through."""
    import common
    calls, real = [], common.scaled_step

    def overflowing(optimizer, *a, **kw):
        if len(calls) in steps:
            next(p for g in optimizer.param_groups for p in g["params"] if p.grad is not None).grad.view(-1)[0] = float("inf")
        calls.append(len(calls))
        return real(optimizer, *a, **kw)
    monkeypatch.setattr(common, "scaled_step", overflowing)
    return calls
