# LLaMA-2 style 1.29B (18 layers, width 2304): ~20 tokens per parameter.
# Sized for 8 x H100 80 GB: DDP, plain loss, no activation checkpointing;
# about 68.1 GB per GPU of the card's 85.0 by tools/plan.py's estimate, under its 10% margin:
#   python tools/plan.py config/full_llama_1.36b.py --gpus=8 --gpu=H100
# Launch: torchrun --standalone --nproc_per_node=8 train.py config/full_llama_1.36b.py
# gradient_accumulation_steps counts the whole job's micro-batches of an optimizer step: 8 x 2048 x 192
# = 3,145,728 tokens per step, and 8,583 steps make 27.0B tokens.
out_dir = "out-llama-1.36b"
dataset = "slimpajama_6b_llama"
preset = "full_llama_1.36b"
block_size = 2048
batch_size = 8
gradient_accumulation_steps = 192
max_iters = 8583
lr_decay_iters = 8583
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
eval_interval = 1000
eval_iters = 100
log_interval = 10
gradient_log_interval = 500
keep_last_n_checkpoints = 3
