# LLaMA-3 1.545B, compute-optimal: 101.9B tokens.
# Sized for 8 x H100 80 GB: DDP, chunked loss for the 128K vocabulary, no activation checkpointing;
# about 66.2 GB per GPU of the card's 85.0 by tools/plan.py's estimate, under its 10% margin:
#   python tools/plan.py config/full_llama3_1.5b_optimal.py --gpus=8 --gpu=H100
# Launch: torchrun --standalone --nproc_per_node=8 train.py config/full_llama3_1.5b_optimal.py
# gradient_accumulation_steps counts the whole job's micro-batches of an optimizer step: 8 x 2048 x 192
# = 3,145,728 tokens per step, and 32,393 steps make 101.9B tokens.
out_dir = "out-llama3-1.5b-optimal"
dataset = "slimpajama_6b_llama3"
preset = "full_llama3_1.5b_optimal"
block_size = 2048
batch_size = 8
gradient_accumulation_steps = 192
max_iters = 32393
lr_decay_iters = 32393
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
eval_interval = 1000
eval_iters = 100
log_interval = 10
gradient_log_interval = 500
keep_last_n_checkpoints = 3
