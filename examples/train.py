"""Fine-tune a (converted) Dynamic-LLaVA checkpoint on a LLaVA-format JSON dataset with the official recipe.

Defaults are those of the official 7B script (`run/train_dynamic_llava_7b.sh`): 1 epoch, lr 5e-6, predictor lr 2e-4,
no weight decay, 3% warmup, cosine schedule, bf16, gradient checkpointing, frozen vision tower, mask loss weight
100, Gumbel temperature 1.0 -> 0.1, keep rates 0.2 (image) / 0.5 (output text), answers < 50 tokens not sparsified.
The official run used 8 GPUs x batch 8 under DeepSpeed ZeRO-3 (global batch 64); pass `--deepspeed` for that.

    python examples/train.py --model_name_or_path path/to/dynamic-llava --data_path data.json \
        --image_folder images/ --output_dir out/

Start from `dynamic-llava convert llava-hf SRC DST` (fresh predictors on a LLaVA-1.5 checkpoint) or from a
converted Dynamic-LLaVA checkpoint.
"""

from dataclasses import dataclass, field

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, HfArgumentParser

from dynamic_llava_hf.train.data import LlavaConversationDataset, LlavaDataCollator
from dynamic_llava_hf.train.trainer import DynamicLlavaTrainer, DynamicLlavaTrainingArguments


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "converted Dynamic-LLaVA folder (or Hub id)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "load through the folder's remote code"})
    freeze_vision_tower: bool = field(default=True, metadata={"help": "the official recipe freezes CLIP"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa or eager (training needs a float mask)"})


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "LLaVA-format JSON (e.g. llava_v1_5_mix665k.json)"})
    image_folder: str = field(metadata={"help": "folder the records' image paths are relative to"})
    model_max_length: int = field(default=2048)
    requires_image: bool = field(default=True, metadata={"help": "skip text-only records (official default)"})


@dataclass
class SparseArguments:
    """The official `SparseArguments`, written into the model config before training."""

    use_vision_predictor: bool = True
    use_output_text_predictor: bool = True
    use_instruct_predictor: bool = False
    vision_keep_rate: float = 0.2
    output_text_keep_rate: float = 0.5
    output_text_len_for_training: int = 50
    instruct_keep_rate: float = 0.7
    instruct_len_for_training: int = 25
    sparse_layer: int = 2
    mask_loss_weight: float = 100.0


@dataclass
class RecipeTrainingArguments(DynamicLlavaTrainingArguments):
    num_train_epochs: float = 1.0
    learning_rate: float = 5e-6
    weight_decay: float = 0.0
    warmup_steps: float = 0.03  # a float < 1 is a share of the steps (transformers 5 dropped warmup_ratio)
    lr_scheduler_type: str = "cosine"
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    bf16: bool = field(default_factory=torch.cuda.is_available)
    tf32: bool | None = field(default_factory=lambda: True if torch.cuda.is_available() else None)
    activation_checkpointing: bool = True
    logging_steps: float = 1
    save_strategy: str = "steps"
    save_steps: float = 50000
    save_total_limit: int = 1
    remove_unused_columns: bool = False
    report_to: str = "none"


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, SparseArguments, RecipeTrainingArguments))
    model_args, data_args, sparse_args, training_args = parser.parse_args_into_dataclasses(args=argv)

    model = AutoModelForImageTextToText.from_pretrained(
        model_args.model_name_or_path,
        trust_remote_code=model_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=torch.float32,  # master weights stay fp32; --bf16 trains under autocast
        **vars(sparse_args),  # predictors switched on here that the checkpoint lacks start freshly initialised
    )
    if model_args.freeze_vision_tower:
        model.model.vision_tower.requires_grad_(False)
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path)

    dataset = LlavaConversationDataset(
        data_args.data_path,
        data_args.image_folder,
        processor,
        model_max_length=data_args.model_max_length,
        requires_image=data_args.requires_image,
    )
    pad_token_id = processor.tokenizer.pad_token_id
    if pad_token_id is None:
        raise ValueError("The tokenizer has no pad token; convert the checkpoint with `dynamic-llava convert`")
    trainer = DynamicLlavaTrainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=LlavaDataCollator(pad_token_id)
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    processor.save_pretrained(training_args.output_dir)


if __name__ == "__main__":
    main()
