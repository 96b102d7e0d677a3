"""Training forward: straight-through keep masks, masked-softmax attention, keep-rate losses, Trainer integration."""

import pytest
import torch
import torch.nn.functional as F
from dynamic_llava_hf.compat_dynamic_llava import CACHE_NAME
from tiny_models import build_prompts, tiny_model
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from dynamic_llava_hf import modeling_dynamic_llava
from dynamic_llava_hf.train.trainer import (
    DynamicLlavaTrainer,
    DynamicLlavaTrainingArguments,
    set_gumbel_tau,
)
from tolerances import FP32_SAME_MATH, FP32_SAME_OP


def training_batch(rows=((3, 1, 12), (5, 1, 7), (2, 1, 9)), answer_lengths=(7, 3, 5), seed=0):
    """Right-padded batch (as in training) with labels on each row's trailing answer tokens."""
    input_ids, attention_mask, pixel_values = build_prompts(list(rows), seed=seed)
    lengths = attention_mask.sum(-1)
    for row in range(len(rows)):  # move each row's tokens to the left: right padding
        input_ids[row] = input_ids[row].roll(-int(input_ids.shape[1] - lengths[row]))
        attention_mask[row] = attention_mask[row].roll(-int(input_ids.shape[1] - lengths[row]))
    labels = torch.full_like(input_ids, -100)
    for row, answer in enumerate(answer_lengths):
        end = int(lengths[row])
        labels[row, end - answer : end] = input_ids[row, end - answer : end]
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, labels=labels)


def straight_through(hard: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    soft = torch.softmax(logits.float(), dim=-1)[..., 0]
    return hard.float() - soft.detach() + soft


def use_inference_decisions(model) -> None:
    """Replaces the Gumbel sampling by the inference rules (top-k per image, keep iff logit_keep > logit_drop) while
    keeping the straight-through gradients, so training and inference make the same decisions."""

    def sample_keep_mask(logits, kind):
        if kind == "image":
            scores = torch.log_softmax(logits.float(), dim=-1)[..., 0]
            num_kept = int(logits.shape[1] * model.config.vision_keep_rate)
            hard = torch.zeros_like(scores).scatter(1, scores.topk(num_kept, dim=-1).indices, 1.0)
        else:
            hard = (logits[..., 0] > logits[..., 1]).float()
        return straight_through(hard, logits)

    model.model.sample_keep_mask = sample_keep_mask


def predictor_grads(model) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in model.named_parameters() if "predictor" in name}


def test_gradients_reach_every_predictor_parameter():
    model = tiny_model(use_instruct_predictor=True, output_text_len_for_training=3, instruct_len_for_training=2)
    model.train()
    batch = training_batch()
    out = model(**batch)
    masks = out_masks = model.model(**batch).training_keep_masks
    assert out_masks.image.shape == (3, 9) and out_masks.output_text.shape == (3, 7)
    assert masks.instruct is not None
    out.loss.backward()
    for name, param in model.named_parameters():
        if "predictor" in name:
            assert param.grad is not None, name
            assert torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, name
    assert out.image_mask_loss is not None and out.output_text_mask_loss is not None
    assert out.instruct_mask_loss is not None


def test_masks_are_hard_and_follow_the_spans():
    model = tiny_model(output_text_len_for_training=4)
    model.train()
    batch = training_batch()
    masks = model.model(**batch).training_keep_masks
    for mask in (masks.image, masks.output_text):
        assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    assert masks.output_text_lengths.tolist() == [7, 3, 5]
    assert (masks.output_text[1, :3] == 1).all()  # 3 < output_text_len_for_training: kept whole
    assert (masks.output_text[1, 3:] == 0).all() and (masks.output_text[2, 5:] == 0).all()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_training_forward_equals_physical_pruning_with_the_same_decisions(attn_implementation):
    model = tiny_model(attn_implementation, output_text_len_for_training=1)
    use_inference_decisions(model)
    batch = training_batch()
    for row in range(3):
        valid = batch["attention_mask"][row].bool()
        ids = batch["input_ids"][row][valid][None]
        labels = batch["labels"][row][valid][None]
        answer_start = int((labels[0] == -100).nonzero().max()) + 1
        pixel_values = batch["pixel_values"][row : row + 1]

        model.train()
        training_logits = model(input_ids=ids, pixel_values=pixel_values, labels=labels).logits.detach()

        # Inference: prefill the prompt, then teacher-force the answer through the ragged cache.
        model.eval()
        with torch.no_grad():
            prefill = model(input_ids=ids[:, :answer_start], pixel_values=pixel_values, use_cache=True)
            kept = prefill.logits[0].abs().sum(-1) > 0  # removed image tokens have zero logits
            assert int(kept.sum()) < answer_start  # image tokens were really removed
            torch.testing.assert_close(
                prefill.logits[0][kept],
                training_logits[0, :answer_start][kept],
                atol=FP32_SAME_MATH,
                rtol=FP32_SAME_MATH,
            )
            cache, decisions = prefill.get(CACHE_NAME), []
            for position in range(answer_start, ids.shape[1]):
                step = model(input_ids=ids[:, position : position + 1], cache=cache, use_cache=True)
                torch.testing.assert_close(
                    step.logits[0, -1], training_logits[0, position], atol=FP32_SAME_MATH, rtol=FP32_SAME_MATH
                )
                decisions.append(bool(step.output_keep_decisions[0, 0]))
        assert 0 < sum(decisions) < len(decisions) or len(decisions) < 4  # the answer really was sparsified


def test_batched_training_forward_equals_per_row():
    model = tiny_model(output_text_len_for_training=1)
    use_inference_decisions(model)
    model.train()
    batch = training_batch()
    batched = model(**batch)
    for row in range(3):
        valid = batch["attention_mask"][row].bool()
        single = model(
            input_ids=batch["input_ids"][row][valid][None],
            pixel_values=batch["pixel_values"][row : row + 1],
            labels=batch["labels"][row][valid][None],
        )
        torch.testing.assert_close(
            batched.logits[row][valid], single.logits[0], atol=FP32_SAME_MATH, rtol=FP32_SAME_MATH
        )


def official_masked_softmax_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """METHOD.md §5.2 written out: exp(s - max) * p_eff, then (a + eps/N) / (sum(a) + eps); causal, no padding."""
    if not isinstance(attention_mask, tuple):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    key_keep = attention_mask[0]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    length = query.shape[2]
    scores = query @ key.transpose(-1, -2) * scaling
    scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    policy = key_keep[:, None, None, :]
    eye = torch.eye(length)
    policy = policy + (1 - policy) * eye
    weights = torch.exp(scores - scores.amax(-1, keepdim=True)) * policy
    eps = 1e-6
    weights = (weights + eps / length) / (weights.sum(-1, keepdim=True) + eps)
    return (weights @ value).transpose(1, 2).contiguous(), weights


def test_gradients_equal_the_official_masked_softmax(monkeypatch):
    """The additive log-mask through sdpa gives the official formula's loss and predictor gradients."""
    model = tiny_model(output_text_len_for_training=2)
    use_inference_decisions(model)
    model.train()
    batch = training_batch(rows=((4, 1, 10), (4, 1, 10)), answer_lengths=(6, 4))
    assert bool(batch["attention_mask"].all())  # the official formula has no padding mask

    # The language-modeling loss alone: its gradient reaches the predictors only through the attention masks (the
    # keep-rate terms would dominate the comparison otherwise).
    model(**batch).lm_loss.backward()
    ours = predictor_grads(model)
    ours_loss = model(**batch).lm_loss.detach()
    model.zero_grad()

    AttentionInterface.register("official_masked_softmax", official_masked_softmax_attention)
    monkeypatch.setattr(
        modeling_dynamic_llava, "build_training_attention_mask", lambda key_keep, valid, dtype: (key_keep,)
    )
    monkeypatch.setattr(model.config.text_config, "_attn_implementation_internal", "official_masked_softmax")
    official = model(**batch)
    official.lm_loss.backward()
    torch.testing.assert_close(official.lm_loss.detach(), ours_loss, atol=FP32_SAME_MATH, rtol=FP32_SAME_MATH)
    for name, grad in predictor_grads(model).items():
        assert grad.abs().sum() > 0, name
        assert (ours[name] - grad).norm() <= 1e-3 * grad.norm(), name


def test_loss_terms_equal_a_hand_computation():
    model = tiny_model(vision_keep_rate=0.5, output_text_len_for_training=5, mask_loss_weight=100.0)
    image_keep = torch.tensor([[1, 0, 0, 1, 1, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 0, 1]])
    answer_keep = torch.tensor([[1, 0, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 1, 0, 0]])

    def fixed_masks(logits, kind):
        hard = image_keep if kind == "image" else answer_keep[:, : logits.shape[1]]
        return straight_through(hard, logits)

    model.model.sample_keep_mask = fixed_masks
    model.train()
    batch = training_batch(answer_lengths=(7, 3, 5))
    out = model(**batch)

    shift_logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    lm_loss = F.cross_entropy(shift_logits, batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    image_ratios = [4 / 9, 7 / 9, 1 / 9]
    image_loss = sum((0.5 - r) ** 2 for r in image_ratios) / 3
    # Row 1's answer (3 tokens) is shorter than 5: kept whole, contributes 0 but counts in the mean.
    text_ratios = {0: 3 / 7, 2: 3 / 5}
    text_loss = ((0.5 - text_ratios[0]) ** 2 + (0.5 - text_ratios[2]) ** 2) / 3
    expected = lm_loss + 100.0 * (image_loss + text_loss)

    torch.testing.assert_close(out.lm_loss, lm_loss)
    torch.testing.assert_close(out.image_mask_loss, torch.tensor(image_loss))
    torch.testing.assert_close(out.output_text_mask_loss, torch.tensor(text_loss))
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.image_keep_ratio, torch.tensor(sum(image_ratios) / 3))
    torch.testing.assert_close(out.output_text_keep_ratio, torch.tensor((text_ratios[0] + text_ratios[2]) / 2))
    assert out.instruct_mask_loss is None and out.instruct_keep_ratio is None


def test_short_answers_get_all_ones_masks_and_no_predictor_gradient():
    model = tiny_model(output_text_len_for_training=50)
    model.train()
    out = model(**training_batch())
    masks = model.model(**training_batch()).training_keep_masks
    assert all(masks.output_text[row, :length].eq(1).all() for row, length in enumerate([7, 3, 5]))
    assert float(out.output_text_mask_loss.detach()) == 0.0 and out.output_text_keep_ratio is None
    out.loss.backward()
    grads = [p.grad for p in model.model.output_text_score_predictor.parameters()]
    assert all(grad is None or not grad.any() for grad in grads)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model(output_text_len_for_training=2)
    use_inference_decisions(model)
    model.train()
    batch = training_batch()
    model(**batch).loss.backward()
    plain = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(**batch).loss.backward()
    for name, param in model.named_parameters():
        if name in plain:
            torch.testing.assert_close(param.grad, plain[name], atol=FP32_SAME_OP, rtol=FP32_SAME_MATH, msg=name)


def test_bf16_autocast_and_frozen_vision_tower():
    model = tiny_model(output_text_len_for_training=2)
    model.model.vision_tower.requires_grad_(False)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**training_batch())
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(param.grad is None for param in model.model.vision_tower.parameters())
    for name, param in model.named_parameters():
        if "predictor" in name or "multi_modal_projector" in name:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert model.model.image_score_predictor.output_mlp[-1].weight.grad.abs().sum() > 0


def test_lora_on_the_language_model_with_trainable_predictors():
    peft = pytest.importorskip("peft")
    model = tiny_model(output_text_len_for_training=2)
    lora = peft.LoraConfig(
        r=4,
        target_modules=r".*language_model.*\.(q_proj|v_proj)",
        modules_to_save=["image_score_predictor", "output_text_score_predictor"],
    )
    peft_model = peft.get_peft_model(model, lora)
    peft_model.train()
    set_gumbel_tau(peft_model, 0.5)
    assert model.model.gumbel_tau == 0.5
    out = peft_model(**training_batch())
    out.loss.backward()
    trainable = {name: param for name, param in peft_model.named_parameters() if param.requires_grad}
    assert any("lora_A" in name for name in trainable) and any("predictor" in name for name in trainable)
    for name, param in trainable.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    base_weights = [p for n, p in peft_model.named_parameters() if "q_proj.base_layer" in n]
    assert base_weights and all(not p.requires_grad for p in base_weights)


def test_training_refuses_a_cache_and_flash_attention(monkeypatch):
    model = tiny_model()
    model.train()
    with pytest.raises(ValueError, match="cannot use a KV cache"):
        model(**training_batch(), use_cache=True)
    # A Hub flash kernel too: transformers registers it with flash attention's mask once downloaded.
    hub_kernel = "kernels-community/flash-attn3"
    masks = type(ALL_MASK_ATTENTION_FUNCTIONS)._global_mapping
    monkeypatch.setitem(masks, hub_kernel, masks["flash_attention_2"])
    for implementation in ("flash_attention_2", hub_kernel):
        monkeypatch.setattr(model.config.text_config, "_attn_implementation_internal", implementation)
        with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
            model(**training_batch())


class SyntheticLlavaData(torch.utils.data.Dataset):
    """Fixed random image+prompt+answer samples (right-padded into batches by `collate`)."""

    def __init__(self, size: int):
        batch = training_batch(rows=[(3 + i % 3, 1, 12) for i in range(size)], answer_lengths=[8] * size, seed=1)
        self.samples = [{key: value[i] for key, value in batch.items()} for i in range(size)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def collate(samples):
    batch = {key: torch.stack([sample[key] for sample in samples]) for key in samples[0]}
    batch["pixel_values"] = torch.stack([sample["pixel_values"] for sample in samples])
    return batch


def test_a_short_trainer_run_lowers_the_loss_and_moves_the_keep_ratio(tmp_path):
    # Starts like a fresh `convert llava-hf` output: predictors untrained, so not used by inference calls.
    model = tiny_model(vision_keep_rate=0.2, output_text_len_for_training=4, predictors_trained=False)
    with torch.no_grad():  # start far from the target: the image predictor keeps ~90% of the tokens
        model.model.image_score_predictor.output_mlp[-1].bias.copy_(torch.tensor([1.1, -1.1]))
    args = DynamicLlavaTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=30,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        predictor_lr=1e-2,
        lr_scheduler_type="constant",
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = DynamicLlavaTrainer(model=model, args=args, train_dataset=SyntheticLlavaData(16), data_collator=collate)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "image_keep_ratio" in entry]
    assert len(logs) == 6
    first, last = logs[0], logs[-1]
    assert last["loss"] < 0.5 * first["loss"]
    assert first["image_keep_ratio"] > 0.7
    assert abs(last["image_keep_ratio"] - 0.2) < abs(first["image_keep_ratio"] - 0.2) / 2
    assert first["predictor_learning_rate"] == 1e-2 and first["llm_learning_rate"] == 1e-3
    taus = [entry["gumbel_tau"] for entry in logs]
    assert taus == sorted(taus, reverse=True) and taus[-1] < 0.2
    for key in ("lm_loss", "image_mask_loss", "output_text_mask_loss", "output_text_keep_ratio"):
        assert key in first
    assert len(trainer.optimizer.param_groups) == 4
    # Trained now: inference calls without sparsity= use the predictors.
    assert model.config.predictors_trained is True
    model.eval()
    batch = training_batch()
    with torch.no_grad():
        assert model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).kept_image_token_indices
