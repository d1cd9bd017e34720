# GPT-2 style 1.27B (18 layers, width 2304): ~20 tokens per parameter.
# Sized for 8 x H100 80 GB: DDP, plain loss, no activation checkpointing;
# about 59.4 GB per GPU of the card's 85.0 by tools/plan.py's estimate, under its 10% margin:
#   python tools/plan.py config/full_gpt2_1.36b.py --gpus=8 --gpu=H100
# Launch: torchrun --standalone --nproc_per_node=8 train.py config/full_gpt2_1.36b.py
# gradient_accumulation_steps counts the whole job's micro-batches of an optimizer step: 16 x 1024 x 96
# = 1,572,864 tokens per step, and 17,166 steps make 27.0B tokens.
out_dir = "out-gpt2-1.36b"
dataset = "slimpajama_6b_gpt2"
preset = "full_gpt2_1.36b"
block_size = 1024
batch_size = 16
gradient_accumulation_steps = 96
max_iters = 17166
lr_decay_iters = 17166
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
