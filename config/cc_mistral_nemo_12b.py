# Stage 1 for Mistral-Nemo-12B-Instruct (the paper's largest text model); same recipe as config/cc_llama3_8b.py.
text_model = "mistralai/Mistral-Nemo-Instruct-2407"
bidirectional = True
pooling = "mean"
lora_r = 16
lora_alpha = 32
lora_dropout = 0.05
gradient_checkpointing = True
instruction = "Given a caption, retrieve a similar relevant caption."
max_length = 512
batch_size = 2048
micro_batch_size = 16  # 12B: smaller forward passes on one 80 GB GPU
max_steps = -1
learning_rate = 2.5e-4  # paper appendix (the official code: 2e-4, config/cc_official.py)
warmup_steps = 300
temperature = 0.05
out_dir = "out-cc-mistral-nemo-12b"
