"""Trains a tiny Dynamic-LLaVA for a few steps with `DynamicLlavaTrainer` and writes the logged losses as JSON.

Run by `test_distributed_training.py`, alone or under `torchrun --nproc_per_node 2` (DDP over gloo on CPU), always
on the same global batch of 4: the two runs must log the same loss curve. The predictors decide by the inference rules
instead of sampling Gumbel noise (see `use_inference_decisions`), so the curve is deterministic and comparable.
"""

import json
import os
import sys

import torch


sys.path.insert(0, os.path.dirname(__file__))
from test_training import SyntheticLlavaData, collate, use_inference_decisions  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

from dynamic_llava_hf.train.trainer import DynamicLlavaTrainer, DynamicLlavaTrainingArguments  # noqa: E402


GLOBAL_BATCH = 4


def main(output_path: str) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    model = tiny_model(output_text_len_for_training=4)
    use_inference_decisions(model)
    extra = {"ddp_backend": "gloo"} if world_size > 1 else {}
    args = DynamicLlavaTrainingArguments(
        output_dir=os.path.dirname(output_path),
        max_steps=6,
        per_device_train_batch_size=GLOBAL_BATCH // world_size,
        learning_rate=1e-3,
        predictor_lr=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",  # the same samples make each global batch, whatever the world size
        seed=0,
        **extra,
    )
    trainer = DynamicLlavaTrainer(model=model, args=args, train_dataset=SyntheticLlavaData(24), data_collator=collate)
    trainer.train()
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        with open(output_path, "w") as file:
            wrapper = type(trainer.model_wrapped).__name__  # DistributedDataParallel under torchrun
            json.dump({"world_size": world_size, "wrapper": wrapper, "losses": losses}, file)
    # Leave without the interpreter's teardown: there, gloo's threads can be destroyed while still joinable ("terminate
    # called without an active exception", SIGABRT; seen on a loaded 2-core CI machine), and an explicit
    # destroy_process_group() can wait forever for a peer that already left (seen here). The barrier makes sure both
    # ranks are done (and rank 0 has written its file) before either exits.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
