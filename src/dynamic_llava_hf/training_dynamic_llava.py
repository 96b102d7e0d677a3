"""Dynamic-LLaVA's training decisions at `sparse_layer`: sampled keep masks instead of removed tokens.

In a training forward nothing is removed. Each predictor samples a hard 0/1 keep mask (Gumbel-softmax with
straight-through gradients) over its tokens: every image's tokens, each row's answer (the supervised tokens of its last
reply) and, optionally, its last instruction. The layers `>= sparse_layer` apply the masks to their keys through the
method's masked softmax (`build_training_attention_mask`), and keep-rate losses pull the realised keep ratios towards
the targets (`add_keep_rate_losses`). See METHOD.md §5.

Part of the remote-code bundle: imports only torch, transformers and its sibling files.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from .sparsity_dynamic_llava import DecoderStep, SparsitySettings, gather_tokens, takes_key_mask


logger = logging.get_logger(__name__)


IGNORE_INDEX = -100
# log(keep + KEEP_FLOOR) is the additive key bias of the masked softmax: 0 for kept keys, about -23 for dropped ones.
# A dropped key then weighs 1e-10 of its unmasked weight (the official masked softmax leaks eps=1e-6 similarly), and
# d bias / d keep = 1 / (keep + KEEP_FLOOR) makes the gradient to a dropped key's mask exactly the method's
# e_ij / sum_k(e_ik keep_k) (v_j - out_i) term, through the standard sdpa/eager kernels.
KEEP_FLOOR = 1e-10


@dataclass
class TrainingKeepMasks:
    """Hard 0/1 keep masks (straight-through gradients) sampled at `sparse_layer` in a training forward.

    `image`: `[num_images, tokens_per_image]`. `output_text` / `instruct`: `[batch, max_span]` over each row's answer
    (the supervised tokens of the last assistant reply) / last instruction, zero past the row's span length
    (`*_lengths`, `[batch]`). Rows shorter than the config's `*_len_for_training` get all-ones masks (no gradient).
    """

    image: torch.Tensor | None = None
    output_text: torch.Tensor | None = None
    output_text_lengths: torch.LongTensor | None = None
    instruct: torch.Tensor | None = None
    instruct_lengths: torch.LongTensor | None = None

    @property
    def sampled(self) -> bool:
        return self.image is not None or self.output_text is not None or self.instruct is not None


def training_spans(
    labels: torch.LongTensor | None, valid: torch.Tensor, image_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[batch, seq]` masks of each row's answer and last instruction, as in the official training code.

    The answer is the trailing run of supervised tokens (labels != -100) of the row; the last instruction is the text
    between the end of the previous supervised run (or of the row's last image) and the answer. Rows without an image
    have no instruction span (their prompt is never pruned).
    """
    columns = torch.arange(valid.shape[1], device=valid.device)
    supervised = valid & (labels != IGNORE_INDEX) if labels is not None else torch.zeros_like(valid)
    prompt = valid & ~supervised
    last_prompt_token = torch.where(prompt, columns, -1).amax(-1, keepdim=True)
    answer = supervised & (columns > last_prompt_token)
    previous_reply_end = torch.where(supervised & (columns < last_prompt_token), columns, -1).amax(-1, keepdim=True)
    last_image = torch.where(image_mask, columns, -1).amax(-1, keepdim=True)
    start = torch.maximum(previous_reply_end, last_image)
    instruction = prompt & ~image_mask & (columns > start) & (last_image >= 0)
    return answer, instruction


def float16_attention(hidden_states: torch.Tensor) -> bool:
    device = hidden_states.device.type
    autocast_float16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
    return hidden_states.dtype == torch.float16 or autocast_float16


def build_training_attention_mask(key_keep: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive `[batch, 1, seq, seq]` mask of the method's masked softmax for layers `>= sparse_layer`.

    Causal and padding entries are masked; every other key gets `log(keep + KEEP_FLOOR)`, so gradients reach the
    keep mask; a query always sees itself whatever its own keep value.
    """
    seq = key_keep.shape[1]
    device = key_keep.device
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    itself = torch.eye(seq, dtype=torch.bool, device=device)
    key_bias = torch.log(key_keep.float() + KEEP_FLOOR)[:, None, :]
    bias = torch.where(itself, torch.zeros((), device=device), key_bias).to(dtype)
    allowed = (causal[None] & valid[:, None, :]) | itself
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def keep_rate_loss(
    masks: torch.Tensor, lengths: torch.Tensor, target: float, min_length: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean over rows of (target - realised keep ratio)^2; rows shorter than `min_length` count as 0 (METHOD §5.3).

    Returns the loss and the realised keep ratio over the rows that count (None if none does).
    """
    ratios = masks.sum(-1) / lengths.clamp(min=1)
    counted = lengths >= max(min_length, 1)
    loss = torch.where(counted, (target - ratios) ** 2, torch.zeros_like(ratios)).mean()
    realised = ratios[counted].mean().detach() if bool(counted.any()) else None
    return loss, realised


def add_keep_rate_losses(output, masks: TrainingKeepMasks, config, settings: SparsitySettings) -> None:
    """Adds `mask_loss_weight` x the keep-rate losses of a training forward to `output.loss` (METHOD.md §5.3) and
    records the separate terms and the realised keep ratios in `output`'s `*_mask_loss` / `*_keep_ratio` fields."""
    if masks.image is not None:
        lengths = torch.full(masks.image.shape[:1], masks.image.shape[1], device=masks.image.device)
        output.image_mask_loss, output.image_keep_ratio = keep_rate_loss(
            masks.image, lengths, settings.vision_keep_rate, 0
        )
    if masks.output_text is not None:
        output.output_text_mask_loss, output.output_text_keep_ratio = keep_rate_loss(
            masks.output_text,
            masks.output_text_lengths,
            config.output_text_keep_rate,
            config.output_text_len_for_training,
        )
    if masks.instruct is not None:
        output.instruct_mask_loss, output.instruct_keep_ratio = keep_rate_loss(
            masks.instruct, masks.instruct_lengths, config.instruct_keep_rate, config.instruct_len_for_training
        )
    terms = [
        term
        for term in (output.image_mask_loss, output.output_text_mask_loss, output.instruct_mask_loss)
        if term is not None
    ]
    if output.loss is not None and terms:
        output.lm_loss = output.loss
        output.loss = output.loss + config.mask_loss_weight * sum(terms[1:], terms[0])


class TrainingDecisionsMixin:
    """The training decisions of `DynamicLlavaModel` (a mixin: they read its config, predictors and `gumbel_tau`)."""

    def check_training_call(self, settings: SparsitySettings, with_cache: bool, inputs_embeds: torch.Tensor) -> None:
        """A training forward (model.train() with sparsification on) samples keep masks; refuse what cannot work."""
        if with_cache:
            raise ValueError(
                "A training forward (model.train() with sparsification on) samples keep masks instead of removing "
                "tokens and cannot use a KV cache: pass use_cache=False, or call model.eval() for inference."
            )
        if settings.use_vision_predictor and settings.vision_selector != "learned":
            raise ValueError(
                f"vision_selector={settings.vision_selector!r} is an inference-time baseline: a training forward "
                "(model.train() with sparsification on) samples the image predictor's Gumbel keep masks. Pass "
                'sparsity={"vision_selector": "learned"} to train, or call model.eval() to run the baseline.'
            )
        if takes_key_mask(self.config.text_config._attn_implementation):
            raise ValueError(
                "Training Dynamic-LLaVA needs the masked softmax of the method, an additive float mask that flash "
                "attention cannot take: load the model with attn_implementation='sdpa' (or 'eager') for training."
            )
        if float16_attention(inputs_embeds):
            logger.warning_once(
                "Training Dynamic-LLaVA in float16: dropped tokens' attention weights (~1e-10 of their unmasked "
                "value) underflow, so their keep masks get no gradient through attention. Train in bfloat16 or "
                "float32."
            )

    def sample_keep_mask(self, logits: torch.Tensor, kind: str) -> torch.Tensor:
        """Hard 0/1 keep mask `[...]` from `[..., 2]` keep/drop logits: Gumbel-softmax at temperature `gumbel_tau`
        with straight-through gradients. `kind` ("image", "output_text", "instruct") says which predictor ran."""
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        return F.gumbel_softmax(log_probs, tau=self.gumbel_tau, hard=True)[..., 0]

    def sample_span_masks(
        self,
        hidden_states: torch.Tensor,
        span: torch.Tensor,
        predictor: nn.Module,
        kind: str,
        min_length: int,
        key_keep: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.LongTensor, torch.Tensor]:
        """Keep masks over each row's span (left-aligned, `[batch, max_span]`), the span lengths, and `key_keep`
        with the masks written at the span's positions."""
        lengths = span.sum(-1)
        width = int(lengths.max())
        positions = torch.sort(~span, dim=-1, stable=True).indices[:, :width]
        in_span = torch.arange(width, device=span.device)[None] < lengths[:, None]
        masks = self.sample_keep_mask(predictor(gather_tokens(hidden_states, positions)), kind) * in_span
        # Spans too short to sparsify are kept whole, without gradient to the predictor.
        too_short = (lengths < min_length)[:, None]
        masks = torch.where(too_short, in_span.to(masks.dtype), masks)
        # Slots past a row's span point at positions outside it: write back what is already there.
        values = torch.where(in_span, masks, torch.gather(key_keep, 1, positions))
        return masks, lengths, key_keep.scatter(1, positions, values)

    def sample_training_masks(
        self, step: DecoderStep, labels: torch.LongTensor | None, settings: SparsitySettings
    ) -> tuple[TrainingKeepMasks, torch.Tensor | None]:
        """Samples the keep masks of a training forward; returns them and the `[batch, seq]` key keep values (None
        when no mask was sampled: the later layers then run like inference without pruning)."""
        config = self.config
        masks = TrainingKeepMasks()
        key_keep = torch.ones(step.valid.shape, dtype=torch.float32, device=step.valid.device)

        if settings.use_vision_predictor and step.tokens_per_image is not None:
            rows, cols = step.image_token_coordinates()
            masks.image = self.sample_keep_mask(self.image_score_predictor(step.hidden_states[rows, cols]), "image")
            key_keep = key_keep.index_put((rows.reshape(-1), cols.reshape(-1)), masks.image.reshape(-1))

        answer, instruction = training_spans(labels, step.valid, step.image_mask)
        if settings.use_output_text_predictor and bool(answer.any()):
            masks.output_text, masks.output_text_lengths, key_keep = self.sample_span_masks(
                step.hidden_states,
                answer,
                self.output_text_score_predictor,
                "output_text",
                config.output_text_len_for_training,
                key_keep,
            )
        if settings.use_instruct_predictor and bool(instruction.any()):
            masks.instruct, masks.instruct_lengths, key_keep = self.sample_span_masks(
                step.hidden_states,
                instruction,
                self.instruct_score_predictor,
                "instruct",
                config.instruct_len_for_training,
                key_keep,
            )
        return masks, key_keep if masks.sampled else None
