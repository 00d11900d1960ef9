# Stage 2 as the official code ran it (microsoft/LLM2CLIP llm2clip/run.sh, EVA02-CLIP-L-14-336), where it
# differs from the paper's settings (config/post_eva02_l14.py); docs/paper.md, "The official code's run".
# torchrun --nproc_per_node=8 post_train.py config/post_official_eva02_l14_336.py --train_shards=... --cache_dir=...
import math

vision_model = "eva02_large_patch14_clip_336.merged2b"  # their EVA02-CLIP-L-14-336 (eva_clip checkpoint)
pretrained = True
embed_dim = 1280  # their model config's embed_dim: a new 1280-d projection
adaptor_blocks = 4
logit_scale_init = math.log(100)  # loaded with their full EVA02-CLIP checkpoint (x100); timm's weights lack it
logit_scale_lr = 0.0  # no separate lr: the scale is in their no-decay group at the base lr
learning_rate = 1e-5  # --lr / --visual-lr / --text-lr 1e-5
weight_decay = 0.05  # --wd / --visual-wd / --text-wd 0.05
layer_decay = 0.85  # --visual-ld 0.85 (their --text-ld 1.01 on the adaptor is not reproduced: no decay there)
beta1, beta2, adam_eps = 0.9, 0.999, 1e-8  # their get_default_params for a model name without "vit"
batch_size = 4096  # --batch-size=512 per GPU x 8 GPUs
micro_batch_size = 128  # per GPU forward; gradient caching makes up the rest (they fit 512 with DeepSpeed ZeRO-1)
gradient_checkpointing = True  # --grad-checkpointing
dtype = "bfloat16"  # they ran --precision fp16 with DeepSpeed loss scaling: dtype="float16" does that (GradScaler); bf16 needs none
grad_clip = 5.0  # --grad-clip-norm=5.0
warmup_steps = 0  # --warmup 0
min_lr = 0.0  # their warmup_cosine_lr decays to 0
max_steps = 20 * (2873538 + 10000225) // 4096  # --epochs=20 over CC3M + CC12M (--train-num-samples-list): 62860
real_caption_ratio = 0.5  # random.choice between their two caption embeddings per sample
seed = 4096  # --seed 4096
num_workers = 8  # --workers=8
save_interval = 3143  # about once per epoch, as --save-frequency 1
eval_interval = 3143
