# Qwen3 1.830B, compute-optimal: 81.7B tokens.
# Sized for 8 x H100 80 GB: DDP, chunked loss for the 152K vocabulary, no activation checkpointing;
# about 61.9 GB per GPU of the card's 85.0 by tools/plan.py's estimate, under its 10% margin:
#   python tools/plan.py config/full_qwen3_1.8b_optimal.py --gpus=8 --gpu=H100
# Launch: torchrun --standalone --nproc_per_node=8 train.py config/full_qwen3_1.8b_optimal.py
# gradient_accumulation_steps counts the whole job's micro-batches of an optimizer step: 4 x 2048 x 384
# = 3,145,728 tokens per step, and 25,972 steps make 81.7B tokens.
out_dir = "out-qwen3-1.8b-optimal"
dataset = "slimpajama_6b_qwen3"
preset = "full_qwen3_1.8b_optimal"
block_size = 2048
batch_size = 4
gradient_accumulation_steps = 384
max_iters = 25972
lr_decay_iters = 25972
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
