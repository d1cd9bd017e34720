# Tulu 3 SFT (Lambert et al. 2024): SFT of Llama-3.1-8B on tulu-3-sft-mixture with the published settings.
# Point init_from at a local transformers copy of the base model and dataset at a local copy of the mixture
# (.jsonl/.parquet), or keep the hub name where the machine has network and `datasets` installed:
#   torchrun --standalone --nproc_per_node=8 train.py config/sft_tulu3.py --init_from=/models/Llama-3.1-8B
# Sized for 8 x H100 80 GB: FSDP, activation checkpointing, chunked loss for the 128K vocabulary, one
# 4096-token row per micro-batch; about 28.0 GB per GPU of the card's 85.0 by engine/plan.py's estimate on
# Llama-3.1-8B's published shape (tests/test_plan.py), under its 10% margin.
out_dir = "out-sft-tulu3"
objective = "sft"
dataset = "hub:allenai/tulu-3-sft-mixture"
init_from = "/path/to/Llama-3.1-8B"  # a local transformers directory; its tokenizer (hf:<dir>) is used
max_seq_length = 4096
block_size = 4096

learning_rate = 5e-6
min_lr = 0.0
lr_schedule = "linear"
warmup_ratio = 0.03
num_train_epochs = 2
weight_decay = 0.0
grad_clip = 1.0
batch_size = 1
gradient_accumulation_steps = 128  # the whole job's micro-batches per step: an effective batch of 128 sequences
val_fraction = 0.001

dtype = "bfloat16"
use_fsdp = True
activation_checkpointing = True
loss_chunk_size = 1024  # 128K vocabulary: never hold the full logits
eval_interval = 500
eval_iters = 20
log_interval = 1
gradient_log_interval = 100
keep_last_n_checkpoints = 2
