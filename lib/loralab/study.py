"""The published study's numbers (Dell, 2023), in one place, so reports can show them beside ours.

LoRA fine-tuning of Llama 2 7B (chat) on one A100-40GB with Meta's llama-recipes,
SAMSum, 2048-token packed chunks. Values as checked in DESIGN.md section 1.
"""

GPU = "NVIDIA A100-SXM4-40GB"
CARD_GIB = 40.0
TRAIN_CHUNKS, VAL_CHUNKS, TEST_CHUNKS = 1555, 84, 87
TRAIN_TOKENS = 3_184_816
LORA_PARAMS = 4_194_304

# Table 3: peak device memory per batch size (GiB); bs 1 is the study's computed Table 1 total.
STEPS_PER_EPOCH = {1: 1555, 4: 388, 7: 222, 8: 194}
PEAK_MEMORY_GIB = {1: 9.31, 4: 26.21, 7: 39.31, 8: None}  # None: out of memory
PEAK_MEMORY_NOTE = {1: "computed (Table 1), not measured", 4: "measured", 7: "measured", 8: "out of memory"}

# Table 4: one epoch (s).
EPOCH_TIME_S = {4: 5003.0, 7: 5073.0}
TOKENS_PER_S = {bs: STEPS_PER_EPOCH[bs] * bs * 2048 / t for bs, t in EPOCH_TIME_S.items()}

# Table 1 / Fig. 2: LoRA int8 memory terms (GB, as printed; the optimizer counts one AdamW state).
TABLE1_GB = {"weights (int8)": 7.0, "LoRA adapter": 0.0084, "gradients": 0.0168,
             "optimizer": 0.0168, "activations": 2.96}
FULL_FINETUNE_FP16_GB = 84.0
