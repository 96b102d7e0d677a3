"""Dynamic-LLaVA's model outputs: Llava's, plus what sparsification decided and the training losses."""

from dataclasses import dataclass

import torch
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast, LlavaModelOutputWithPast

from .training_dynamic_llava import TrainingKeepMasks


@dataclass
class DynamicLlavaModelOutputWithPast(LlavaModelOutputWithPast):
    r"""
    Same as [`~transformers.models.llava.modeling_llava.LlavaModelOutputWithPast`] (the cache is `cache` from
    transformers 5.24 on, `past_key_values` before), plus:

    image_hidden_states (`torch.Tensor`, *optional*):
        Projected image features, `[num_images, tokens_per_image, hidden_size]` (a plain field on every supported
        transformers release; 5.24 also fills `image_outputs`).
    kept_image_token_indices (`list[torch.LongTensor]`, *optional*):
        Per row, the indices (into that row's image tokens, ascending) of the image tokens kept at `sparse_layer`.
        `None` when no image pruning ran in this call.
    output_keep_decisions (`torch.BoolTensor`, *optional*):
        `[batch, new_tokens]`, whether each token's K/V was kept in layers `>= sparse_layer` by the output-text
        predictor. `None` when the predictor did not run in this call.
    training_keep_masks (`TrainingKeepMasks`, *optional*):
        The hard straight-through keep masks sampled in a training forward (`model.train()`).
    """

    image_hidden_states: torch.Tensor | None = None
    kept_image_token_indices: list[torch.LongTensor] | None = None
    output_keep_decisions: torch.BoolTensor | None = None
    training_keep_masks: TrainingKeepMasks | None = None


@dataclass
class DynamicLlavaCausalLMOutputWithPast(LlavaCausalLMOutputWithPast):
    r"""
    Same as [`~transformers.models.llava.modeling_llava.LlavaCausalLMOutputWithPast`]. `logits` stay aligned with the
    input positions; positions removed at `sparse_layer` get zero logits.

    image_hidden_states (`torch.Tensor`, *optional*):
        See [`DynamicLlavaModelOutputWithPast`].
    kept_image_token_indices (`list[torch.LongTensor]`, *optional*):
        See [`DynamicLlavaModelOutputWithPast`].
    output_keep_decisions (`torch.BoolTensor`, *optional*):
        See [`DynamicLlavaModelOutputWithPast`].
    lm_loss (`torch.FloatTensor`, *optional*):
        In training with `labels`: the language-modeling cross-entropy alone. `loss` adds `mask_loss_weight` times
        the keep-rate losses below.
    image_mask_loss, output_text_mask_loss, instruct_mask_loss (`torch.FloatTensor`, *optional*):
        Keep-rate losses of a training forward: per mask, the squared gap between the target keep rate and the
        realised keep ratio, averaged over images (image) or rows (text). `None` when that predictor did not run.
    image_keep_ratio, output_text_keep_ratio, instruct_keep_ratio (`torch.FloatTensor`, *optional*):
        Realised keep ratios of a training forward, for logging (text: over the rows long enough to be sparsified).
    """

    image_hidden_states: torch.Tensor | None = None
    kept_image_token_indices: list[torch.LongTensor] | None = None
    output_keep_decisions: torch.BoolTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    image_mask_loss: torch.FloatTensor | None = None
    output_text_mask_loss: torch.FloatTensor | None = None
    instruct_mask_loss: torch.FloatTensor | None = None
    image_keep_ratio: torch.FloatTensor | None = None
    output_text_keep_ratio: torch.FloatTensor | None = None
    instruct_keep_ratio: torch.FloatTensor | None = None
