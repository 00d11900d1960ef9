# Paper setting: SigLIP2 So400m/14 at 224 px (its own mean/std come from timm) post-trained with Llama-3-8B-CC (4096-d) embeddings.
# torchrun --nproc_per_node=8 post_train.py config/post_siglip2_so400m.py --train_manifest=... --cache_dir=...
# max_steps: set it for your data (epochs x records / batch_size).
import math

vision_model = "vit_so400m_patch14_siglip_224.v2_webli"
pretrained = True
embed_dim = -1  # its own pooled 1152-d output (attention-pool head), no new Linear: the official config has
# embed_dim 1152 with timm_pool "map", timm_proj "none" (Llama3.1-8B-Siglip2-So-L-14-224.json)
adaptor_blocks = 4
# SigLIP's own scale (~x112 for SigLIP So400m/14-384, with a logit bias near -16) belongs to its sigmoid loss
# and is not carried by timm's weights; the official SigLIP2 config builds eva_clip's CustomCLIP, whose scale
# starts at ln(1/0.07) (x14.3) unless a full checkpoint is loaded, and trains it with the softmax loss
logit_scale_init = math.log(1 / 0.07)
learning_rate = 1e-5
weight_decay = 0.05
layer_decay = 0.85
batch_size = 4096  # global
micro_batch_size = 128  # per GPU forward; the rest is gradient caching (negatives stay the global batch)
gradient_checkpointing = True
dtype = "bfloat16"
grad_clip = 5.0
warmup_steps = 500
max_steps = 15000
num_workers = 8
save_interval = 1000
eval_interval = 1000
