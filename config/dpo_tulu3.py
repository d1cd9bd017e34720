# Tulu 3 DPO: length-normalised DPO (open-instruct's dpo_norm) on the Tulu 3 8B preference mixture, starting from
# the Tulu 3 SFT model, with the published settings:
#   torchrun --standalone --nproc_per_node=8 train.py config/dpo_tulu3.py --init_from=out-sft-tulu3
# Sized for 8 x H100 80 GB: FSDP, activation checkpointing, one pair (2 x 2048 tokens) per micro-batch;
# about 30.7 GB per GPU of the card's 85.0 by engine/plan.py's estimate on Llama-3.1-8B's published shape
# (tests/test_plan.py), under its 10% margin.
out_dir = "out-dpo-tulu3"
objective = "dpo"
dataset = "hub:allenai/llama-3.1-tulu-3-8b-preference-mixture"
init_from = "out-sft-tulu3"  # our SFT checkpoint folder, or a local transformers directory
max_seq_length = 2048
block_size = 2048

dpo_loss_type = "dpo_norm"
dpo_beta = 5.0
learning_rate = 5e-7
min_lr = 0.0
lr_schedule = "linear"
warmup_ratio = 0.1
num_train_epochs = 1
weight_decay = 0.0
batch_size = 1
gradient_accumulation_steps = 128  # effective batch of 128 pairs
val_fraction = 0.001

dtype = "bfloat16"
use_fsdp = True
activation_checkpointing = True
eval_interval = 200
eval_iters = 20
log_interval = 1
gradient_log_interval = 0
keep_last_n_checkpoints = 2
