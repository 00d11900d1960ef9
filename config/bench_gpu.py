# bench.py on one GPU at the paper's real sizes: a ViT-L/14-224 trained in bf16 autocast against a
# Llama-3-8B-shaped frozen text encoder (random weights: speed depends only on the shape) on 128-token
# captions, so the text/vision FLOPs ratio is the paper's itself (scale factor 1). Prints MFU
# (peak_flops: bf16 dense by device name, H100 989e12, A100 312e12; set it for other GPUs).
#   python bench.py config/bench_gpu.py
device = "cuda"
dtype = "bfloat16"
threads = 8
repeats = 10
warmup = 3
steps = 5
batch_size = 128  # per GPU (paper: 4096 over 8 GPUs = 512 with checkpointing); fits ViT-L next to the 16 GB LLM
vision_model = "vit_large_patch14_clip_224"
timm_kwargs = {}
embed_dim = 1280  # the official code's projection size
gradient_checkpointing = False
cache_records = 1024
text_layers = 32  # Llama-3-8B
text_width = 4096
text_heads = 32
text_kv_heads = 8
text_ffn = 14336
caption_tokens = 128  # = paper_caption_tokens
embed_short = 200  # COCO captions (1:1 with the long ones, as in the CPU run)
embed_long = 200  # all of shared/data's DOCCI descriptions (synthetic lengths where absent)
embed_layers = 0  # the whole 8B-shaped encoder
embed_repeats = 5
embed_batch_tokens = 16384  # embed_captions.py's default; fixed batches of 16384 // 512 = 32
embed_copies = 5  # 2000 captions: the sorted batches' padding near its large-corpus limit
embed_attn = "flash_attention_2"  # pip install flash-attn; every (c) scheme runs on it (padded ones unpad inside attention)
embed_packed = True  # padding-free rows, variable-length attention: what neither padding nor sorting can beat
vocab_size = 8000
mem_global_batch = 256
mem_chunk = 32
mem_max_length = 256
mem_width = 256
mem_layers = 2
mem_repeats = 2
