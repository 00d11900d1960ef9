# bench.py in seconds on a CPU: every benchmark's code path with toy sizes (tests/test_bench.py, CI).
# The numbers mean little at this size; run plain `python bench.py` (the tiny CPU default) for those.
repeats = 2
warmup = 0
steps = 1
batch_size = 4
timm_kwargs = {"img_size": 16, "patch_size": 4, "depth": 1}
embed_dim = 32
adaptor_blocks = 1
cache_records = 8
text_layers = 1
text_width = 64
text_heads = 2
text_kv_heads = 2
text_ffn = 128
embed_short = 6
embed_long = 6
embed_layers = 1
embed_repeats = 1
embed_batch_tokens = 256
embed_max_length = 128
vocab_size = 400
mem_global_batch = 64
mem_chunk = 8
mem_max_length = 64
mem_width = 16
mem_repeats = 1
mem_steps = 2
