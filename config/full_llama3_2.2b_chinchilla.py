# LLaMA-3 2.224B at the Chinchilla ratio budget: 61.5B tokens.
# Sized for 8 x H100 80 GB: ZeRO-1, chunked loss for the 128K vocabulary, no activation checkpointing;
# about 56.9 GB per GPU of the card's 85.0 by tools/plan.py's estimate, under its 10% margin:
#   python tools/plan.py config/full_llama3_2.2b_chinchilla.py --gpus=8 --gpu=H100
# Launch: torchrun --standalone --nproc_per_node=8 train.py config/full_llama3_2.2b_chinchilla.py
# gradient_accumulation_steps counts the whole job's micro-batches of an optimizer step: 4 x 2048 x 384
# = 3,145,728 tokens per step, and 19,550 steps make 61.5B tokens.
out_dir = "out-llama3-2.2b-chinchilla"
dataset = "slimpajama_6b_llama3"
preset = "full_llama3_2.2b_chinchilla"
block_size = 2048
batch_size = 4
gradient_accumulation_steps = 384
max_iters = 19550
lr_decay_iters = 19550
warmup_iters = 2000
learning_rate = 0.0003
min_lr = 3e-05
lr_schedule = "cosine"
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
dtype = "bfloat16"
compile = True
loss_chunk_size = 1024
use_zero1 = True
eval_interval = 1000
eval_iters = 100
log_interval = 10
gradient_log_interval = 500
keep_last_n_checkpoints = 3
