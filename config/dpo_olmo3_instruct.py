# OLMo 3 Instruct DPO settings (beta 5, lr 1e-6, warmup ratio 0.1, linear decay, 1 epoch, max length 2048) on
# chat-format preference pairs (Dolci-Instruct style: chosen and rejected message lists sharing the prompt turns).
# The dataset name below is a placeholder for the OLMo 3 preference data: set dataset= to your local copy.
#   torchrun --standalone --nproc_per_node=8 train.py config/dpo_olmo3_instruct.py --init_from=/models/olmo3-sft \
#       --dataset=/data/dolci_instruct_dpo.jsonl
# Sized for 8 x H100 80 GB: FSDP, activation checkpointing, one pair (2 x 2048 tokens) per micro-batch;
# about 27.1 GB per GPU of the card's 85.0 by engine/plan.py's estimate, on OLMo 2 7B's published shape
# (32 x 4096, 32 heads, MLP 11008, vocabulary 100,352), which the OLMo 3 7B model is assumed to share.
out_dir = "out-dpo-olmo3-instruct"
objective = "dpo"
dataset = "hub:allenai/Dolci-Instruct-DPO"
init_from = "/path/to/OLMo-3-SFT"
max_seq_length = 2048
block_size = 2048

dpo_loss_type = "dpo_norm"
dpo_beta = 5.0
learning_rate = 1e-6
min_lr = 0.0
lr_schedule = "linear"
warmup_ratio = 0.1
num_train_epochs = 1
weight_decay = 0.0
batch_size = 1
gradient_accumulation_steps = 128
val_fraction = 0.001

dtype = "bfloat16"
use_fsdp = True
activation_checkpointing = True
eval_interval = 200
eval_iters = 20
log_interval = 1
gradient_log_interval = 0
keep_last_n_checkpoints = 2
