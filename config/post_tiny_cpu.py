# Tiny CPU run of stage 2 on the synthetic shapes data (data.make_synthetic_dataset) with a tiny
# text model's cache: a 2-block width-64 ViT at 32x32 px from scratch, a few hundred steps on 2 cores.
# The inputs are what `python pipeline.py` writes, so after it `python post_train.py config/post_tiny_cpu.py`
# runs as written; the output is a folder of its own (the pipeline's stage 2, 800 steps, is out-tiny/post).
import math

out_dir = "out-tiny/post_preset"
train_manifest = "out-tiny/data/train.jsonl"
cache_dir = "out-tiny/cache_train"
val_manifest = "out-tiny/data/val.jsonl"  # its captions are embedded at start (the pipeline passes out-tiny/cache_val)
eval_field = "long_captions"  # the synthetic short captions ("a red circle") are shared by many images
# made tinier below: 32 px, 8 px patches, width 64, 2 blocks. pipeline.py trains an OpenAI-CLIP-style tower
# instead (its `vision_model`), so that out-tiny/post exports with `evaluate.py --task=export_hf`; this one
# has no transformers class (no pre-norm) and learns faster in a few dozen steps (tests/test_post_train.py)
vision_model = "vit_tiny_patch16_224"
pretrained = False  # from scratch: no weights on a CPU box
timm_kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
embed_dim = 64  # the shared-space projection; timm_kwargs["embed_dim"] above is the ViT width
adaptor_blocks = 2
gradient_checkpointing = False
dtype = "float32"
batch_size = 64
num_workers = 1
learning_rate = 1e-3  # from scratch: far above the 1e-5 used to post-train a pretrained CLIP
logit_scale_init = math.log(1 / 0.07)  # from scratch: CLIP's init (x14.3); a pretrained CLIP's is x100
logit_scale_lr = 1e-2  # AdamW moves it ~lr per step: at 1e-3 it would barely leave x14 in a few hundred steps
weight_decay = 0.05
layer_decay = 1.0  # nothing pretrained to protect
warmup_steps = 20
max_steps = 300
log_interval = 20
eval_interval = 100
save_interval = 100
