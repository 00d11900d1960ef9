# Paper setting: EVA02-CLIP-L/14 (merged2b) at 224 px post-trained with Llama-3-8B-CC (4096-d) embeddings.
# torchrun --nproc_per_node=8 post_train.py config/post_eva02_l14.py --train_manifest=... --cache_dir=...
# max_steps: set it for your data (epochs x records / batch_size).
import math

vision_model = "eva02_large_patch14_clip_224.merged2b"
pretrained = True
embed_dim = 1280  # a new 1280-d projection head, as the official code
adaptor_blocks = 4
logit_scale_init = math.log(100)  # the EVA02-CLIP checkpoint's own (x100, at the clamp); timm's weights lack it
learning_rate = 1e-5
weight_decay = 0.05
layer_decay = 0.85
batch_size = 4096  # global
micro_batch_size = 256  # per GPU forward; the rest is gradient caching (negatives stay the global batch)
gradient_checkpointing = True
dtype = "bfloat16"
grad_clip = 5.0
warmup_steps = 500
max_steps = 15000
num_workers = 8
save_interval = 1000
eval_interval = 1000
