"""Dynamic-LLaVA: LLaVA-1.5 with learned vision/text context sparsification (Huang et al., ICLR 2025).

The model runs the text backbone's decoder layers in its own loop so that, at the input of `sparse_layer`, it can
physically remove image tokens (top-k per image by the image predictor, or by a random or FastV-style baseline
selector) and gate which generated tokens enter the KV cache of the later layers (output-text predictor). In training
nothing is removed: the predictors sample hard Gumbel-softmax keep masks with straight-through gradients, applied as
key masks in the layers `>= sparse_layer`.

The remote-code bundle, flat beside this file: `predictors_` (the three predictors), `sparsity_` (per-call settings,
the step state, attention masks), `inference_` and `training_` (what is kept at `sparse_layer`), `cache_` (the ragged
KV cache) and `static_cache_` (its fixed-capacity, compileable form), `compat_` (what differs between transformers
releases), `outputs_`, `generation_` (the `generate()` hooks), `pretrained_` (the
base class: flags, weight initialisation, remote-code saving) and `configuration_dynamic_llava.py`. Everything else is
transformers' Llava.
"""

import torch
from torch import nn
from transformers import AutoModel, LlavaForConditionalGeneration, LlavaModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector, LlavaPreTrainedModel
from transformers.utils import logging

from .cache_dynamic_llava import FULL_GROUP, SPARSE_GROUP, DynamicLlavaCache, KeyLayout, cache_for_forward
from .compat_dynamic_llava import CACHE_NAME, cache_and_image_fields, cache_argument
from .compiled_prefill_dynamic_llava import CompiledPrefillMixin
from .configuration_dynamic_llava import DynamicLlavaConfig
from .generation_dynamic_llava import DynamicLlavaGenerationMixin
from .inference_dynamic_llava import InferenceDecisionsMixin
from .outputs_dynamic_llava import DynamicLlavaCausalLMOutputWithPast, DynamicLlavaModelOutputWithPast
from .predictors_dynamic_llava import DynamicLlavaImagePredictor, DynamicLlavaTextPredictor
from .pretrained_dynamic_llava import DynamicLlavaPreTrainedModel
from .sparsity_dynamic_llava import (
    DecoderStep,
    SparseLayerPlan,
    SparsitySettings,
    build_attention_mask,
    resolve_sparsity,
)
from .training_dynamic_llava import (
    TrainingDecisionsMixin,
    TrainingKeepMasks,
    add_keep_rate_losses,
    build_training_attention_mask,
)


logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Models


class DynamicLlavaModel(
    CompiledPrefillMixin, InferenceDecisionsMixin, TrainingDecisionsMixin, DynamicLlavaPreTrainedModel, LlavaModel
):
    """Llava backbone whose decoder loop prunes image tokens and gates the KV cache at `sparse_layer`."""

    # Temperature of the training-time Gumbel-softmax; `GumbelTemperatureCallback` anneals it from 1.0 to 0.1.
    gumbel_tau: float = 1.0
    _keep_in_fp32_modules = ("vision_tower", "multi_modal_projector")  # plus the predictors built (see __init__)

    def __init__(self, config):
        # Same sub-modules (and so the same state-dict keys) as LlavaModel, plus the predictors.
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)

        hidden_size = config.text_config.hidden_size
        self.image_score_predictor = (
            DynamicLlavaImagePredictor(
                hidden_size,
                config.predictor_d_model,
                config.predictor_num_heads,
                config.predictor_ffn_dim,
                config.predictor_num_layers,
            )
            if config.use_vision_predictor
            else None
        )
        self.output_text_score_predictor = (
            DynamicLlavaTextPredictor(hidden_size, config.predictor_d_model)
            if config.use_output_text_predictor
            else None
        )
        self.instruct_score_predictor = (
            DynamicLlavaTextPredictor(hidden_size, config.predictor_d_model) if config.use_instruct_predictor else None
        )
        predictors = ("image_score_predictor", "output_text_score_predictor", "instruct_score_predictor")
        self._keep_in_fp32_modules = [
            *DynamicLlavaModel._keep_in_fp32_modules,
            *(name for name in predictors if getattr(self, name) is not None),
        ]
        self.post_init()

    # -----------------------------------------------------------------------------------------------------------------
    # Inputs

    def image_token_mask(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """`[batch, seq]` bool: where the image placeholder tokens are."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embedding).all(-1)

    def check_inputs(self, input_ids, inputs_embeds, pixel_values, mm_encoder_outputs) -> None:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if pixel_values is not None and mm_encoder_outputs is not None:
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")

    def get_image_features(self, pixel_values: torch.FloatTensor, *args, **kwargs):
        # generate() encodes the images through this method before the first forward: check them here, not only there.
        self.check_pixel_values(pixel_values)
        return super().get_image_features(pixel_values, *args, **kwargs)

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        vision = self.config.vision_config
        expected = (getattr(vision, "num_channels", 3), vision.image_size, vision.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape [num_images, {expected[0]}, {expected[1]}, {expected[2]}] for this "
                f"vision tower, got {list(pixel_values.shape)}"
            )

    def merge_image_features(
        self,
        inputs_embeds: torch.Tensor,
        image_mask: torch.Tensor,
        image_features: list[torch.Tensor],
        tokens_per_image: int | None = None,
        tokens_per_row: list[int] | None = None,
    ) -> tuple[torch.Tensor, int | None]:
        """Writes the image features into the placeholder positions; returns the embeddings and tokens per image.

        With `tokens_per_image`, the features come as one block (a prefill chunk's share, as `generate()` slices
        them) and are regrouped per image. If the chunk holds only part of an image, the features are placed as Llava
        places them and the tokens per image are None: such images cannot be pruned. `tokens_per_row`: the
        placeholders per row, where the caller has read them (else they are read here).
        """
        if tokens_per_row is None:
            tokens_per_row = image_mask.sum(-1).tolist()
        num_tokens = sum(tokens_per_row)
        if tokens_per_image is not None:
            block = torch.cat([features.reshape(-1, features.shape[-1]) for features in image_features])
            if block.shape[0] != num_tokens:
                raise ValueError(f"{num_tokens} image tokens but {block.shape[0]} image features")
            if any(count % tokens_per_image for count in tokens_per_row):
                block = block.to(inputs_embeds.device, inputs_embeds.dtype)
                return inputs_embeds.masked_scatter(image_mask[..., None], block), None
            image_features = block.split(tokens_per_image)
        tokens_per_image = {features.shape[0] for features in image_features}
        if len(tokens_per_image) != 1:
            raise ValueError(
                "Every image must yield the same number of tokens for per-image pruning, "
                f"got {sorted(tokens_per_image)}"
            )
        tokens_per_image = tokens_per_image.pop()
        num_features = tokens_per_image * len(image_features)
        if num_tokens != num_features:
            raise ValueError(
                f"Image features and image tokens do not match, tokens: {num_tokens}, features: {num_features}. The "
                f"input has {num_tokens} image tokens (id {self.config.image_token_id}) but the {len(image_features)} "
                f"image(s) give {num_features} features ({tokens_per_image} per image): the prompt must contain "
                f"{tokens_per_image} image tokens per image."
            )
        if any(count % tokens_per_image for count in tokens_per_row):
            raise ValueError(
                f"Image tokens per row {tokens_per_row} are not multiples of the {tokens_per_image} tokens "
                "per image: every image must lie whole inside one row."
            )
        features = torch.cat(image_features, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(image_mask[..., None], features)
        return inputs_embeds, tokens_per_image

    def resolve_cache(self, past_key_values, use_cache: bool | None) -> tuple[DynamicLlavaCache | None, bool]:
        """The cache this forward reads and fills (None: none), and the resolved `use_cache`."""
        if use_cache is None:
            use_cache = self.config.text_config.use_cache and not self.training
        return cache_for_forward(past_key_values, self.config, use_cache), use_cache

    # -----------------------------------------------------------------------------------------------------------------
    # Phases of the forward

    def start_step(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: DynamicLlavaCache | None,
        num_generated_tokens: int,
        prefill: bool = False,
    ) -> DecoderStep:
        """The step state at the first decoder layer: padding mask, original positions and their RoPE."""
        if cache is not None:
            cache.check_fits(self.config, inputs_embeds.shape[0])
        # Tokens seen: an int, or a tensor for the fixed-capacity cache (its decoding step reads nothing on the host).
        past_seen, has_past = (cache.step_offset(), cache.has_past) if cache is not None else (0, False)
        if num_generated_tokens and has_past:
            raise ValueError("num_generated_tokens is for decoding without a cache; with a cache pass only new tokens")
        batch, num_new = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < num_new:
                raise ValueError(
                    f"attention_mask must be a 2D padding mask [batch, past + new tokens] = [{batch}, "
                    f"{int(past_seen) + num_new}], got {list(attention_mask.shape)}"
                )
            valid = attention_mask[:, -num_new:].to(device=device, dtype=torch.bool)
        else:
            valid = torch.ones(batch, num_new, dtype=torch.bool, device=device)
        if position_ids is None:
            position_ids = (past_seen + torch.arange(num_new, device=device))[None]
        position_ids = position_ids.to(device).expand(batch, num_new)
        return DecoderStep(
            valid=valid,
            past_seen=past_seen,
            has_past=has_past,
            num_generated_tokens=num_generated_tokens,
            prefill=prefill,
            hidden_states=inputs_embeds,
            position_embeddings=self.language_model.rotary_emb(inputs_embeds, position_ids),
        )

    def embed_images(
        self,
        step: DecoderStep,
        input_ids: torch.LongTensor | None,
        pixel_values: torch.FloatTensor | None,
        mm_encoder_outputs: dict | None,
        tokens_per_image: int | None = None,
        **vision_kwargs,
    ) -> BaseModelOutputWithPooling | None:
        """Encodes the images (unless `mm_encoder_outputs` holds them) and merges them into the step's placeholders
        (setting `image_mask` and `tokens_per_image`); returns the image encoder's output (features: `pooler_output`).

        A placeholder id the model generated itself (a decoding step, or the output part of a no-cache step) is an
        ordinary token, as in Llava.
        """
        if not step.decoding:
            step.image_mask = self.image_token_mask(input_ids, step.hidden_states)
        if step.num_generated_tokens:
            step.image_mask[:, step.num_new - step.num_generated_tokens :] = False
        if not step.decoding:
            step.read_counts()  # before the tower is queued: no later read in the forward waits for it
        image_outputs = None
        if mm_encoder_outputs is not None and mm_encoder_outputs.get("image") is not None:
            image_outputs = mm_encoder_outputs["image"]
        elif pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values=pixel_values, return_dict=True, **vision_kwargs)
        if image_outputs is not None:
            step.hidden_states, step.tokens_per_image = self.merge_image_features(
                step.hidden_states,
                step.image_mask,
                image_outputs.pooler_output,
                tokens_per_image,
                tokens_per_row=None if step.counts is None else step.counts.image_tokens,
            )
            step.split_images = step.tokens_per_image is None
        elif not step.decoding and any(step.counts.image_tokens):  # a decoding step has no placeholders
            # As in Llava: without images, placeholder ids are ordinary tokens (and nothing is pruned).
            logger.warning_once(
                f"The input contains image tokens (id {self.config.image_token_id}) but no pixel_values or image "
                "features: they are treated as ordinary text tokens."
            )
            step.clear_image_tokens()
        return image_outputs

    def start_outputs(self, step: DecoderStep, output_hidden_states, output_attentions: bool | None) -> None:
        """Prepares the step to collect hidden states and attention weights, as the call or else the config asks.

        `output_hidden_states` may select indices (an int or a list, negative ones counted from the end, as in
        transformers 5): the others are returned as None. Attention weights need eager attention; see
        `DecoderStep.record_attentions` for how the layers `>= sparse_layer` map theirs to the input positions.
        """
        text_config = self.config.text_config
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states or text_config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions or text_config.output_attentions
        if output_hidden_states:
            if not isinstance(output_hidden_states, bool):
                count = text_config.num_hidden_layers + 1
                indices = [output_hidden_states] if isinstance(output_hidden_states, int) else output_hidden_states
                step.hidden_states_selection = {index % count for index in indices if -count <= index < count}
            step.all_hidden_states = []
            step.record_hidden_states()
        if output_attentions:
            step.all_attentions = []

    def layer_groups(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """The text backbone's decoder layers below `sparse_layer` and from it on. Plain lists: slicing the
        `ModuleList` would build a new one, registering each layer again, at every forward."""
        layers = list(self.language_model.layers)[: self.config.text_config.num_hidden_layers]
        return layers[: self.config.sparse_layer], layers[self.config.sparse_layer :]

    def run_layers(
        self,
        layers: list[nn.Module],
        group: int,
        step: DecoderStep,
        cache: DynamicLlavaCache | None,
        key_keep: torch.Tensor | None = None,
        **kwargs,
    ) -> None:
        """Runs one group of decoder layers (`FULL_GROUP` below `sparse_layer`, `SPARSE_GROUP` from it) over the
        step's slots. `key_keep`: the training keep values of the keys (a training forward's later layers)."""
        layout = KeyLayout.empty()
        if cache is not None:
            layout = cache.begin_step(group, step.persist, step.slot_positions(), persist_counts=step.persist_counts)
        dtype = step.hidden_states.dtype
        if key_keep is not None:
            mask = build_training_attention_mask(key_keep, step.visible, dtype)
        else:
            attn_implementation = self.config.text_config._attn_implementation
            mask = build_attention_mask(attn_implementation, layout, step.visible, dtype, step.visible_all)
        if self.uses_compiled_loop(step, layout, key_keep):
            self.run_compiled_loop(layers, step, cache, mask, **kwargs)
            return
        if step.all_attentions is not None:
            # The attention modules return their weights (eager only; other backends warn and return None).
            kwargs = {**kwargs, "output_attentions": True}
            key_positions = step.key_positions(layout)  # the same for every layer of the group
            if step.keys_at_input_positions(key_positions):
                key_positions = None  # the weights need no mapping
        for layer in layers:
            weights = []
            hook = None
            if step.all_attentions is not None:
                hook = layer.self_attn.register_forward_hook(lambda module, args, output: weights.append(output[1]))
            try:
                # The mask goes in positionally, as the hidden states do: in training it carries the predictors'
                # soft keep decisions (it requires grad), and reentrant gradient checkpointing
                # (`use_reentrant=True`) only routes gradients through positional inputs. As a keyword it was replayed
                # inside the checkpoint's backward, which then ran into the predictors' graph once per layer
                # ("Trying to backward through the graph a second time").
                step.hidden_states = layer(
                    step.hidden_states,
                    mask,
                    position_embeddings=step.position_embeddings,
                    **{CACHE_NAME: cache},
                    **kwargs,
                )
            finally:
                if hook is not None:
                    hook.remove()
            step.record_hidden_states()
            if weights and weights[0] is not None:
                step.record_attentions(weights[0], key_positions)

    def decide_at_sparse_layer(
        self,
        step: DecoderStep,
        settings: SparsitySettings,
        training: bool,
        labels: torch.LongTensor | None,
        cache: DynamicLlavaCache | None,
    ) -> tuple[SparseLayerPlan, TrainingKeepMasks | None, torch.Tensor | None]:
        """The plan for the layers `>= sparse_layer`, plus (training) the sampled keep masks and the key keep values.

        A training forward removes nothing: its keep masks act on the keys of the later layers instead.
        """
        if training:
            masks, key_keep = self.sample_training_masks(step, labels, settings)
            return SparseLayerPlan.keep_all(step.valid), masks, key_keep
        plan = self.plan_sparse_layer(step, settings)
        if cache is not None:
            # Seen/kept counts behind the cache's `sparsity_report()`.
            if step.tokens_per_image is not None or step.split_images:
                image_tokens = step.image_mask & step.valid
                cache.record_tokens("image", image_tokens.sum(-1), (step.image_mask & plan.persist).sum(-1))
            if step.decoding:
                cache.record_tokens("generated", step.valid.sum(-1), plan.persist.sum(-1))
        return plan, None, None

    def finish_step(self, step: DecoderStep, cache: DynamicLlavaCache | None) -> torch.Tensor:
        """Final norm, every input position back in place (removed ones get zeros); the cache advances its lengths."""
        hidden_states = step.scatter(self.language_model.norm(step.hidden_states))
        if step.all_hidden_states is not None and step.all_hidden_states[-1] is not None:
            step.all_hidden_states[-1] = hidden_states  # transformers' convention: the last entry is normed
        if cache is not None:
            cache.end_step(step.num_new)
        return hidden_states

    # -----------------------------------------------------------------------------------------------------------------
    # Forward

    def step_output(self, step, hidden_states, image_outputs, cache, plan, training_keep_masks):
        """The forward's output: Llava's fields, plus what was kept at `sparse_layer` (or the training masks)."""
        return DynamicLlavaModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(step.all_hidden_states) if step.all_hidden_states is not None else None,
            attentions=tuple(step.all_attentions) if step.all_attentions is not None else None,
            image_hidden_states=torch.stack(list(image_outputs.pooler_output)) if image_outputs is not None else None,
            **cache_and_image_fields(cache, image_outputs),
            kept_image_token_indices=plan.kept_image_token_indices,
            output_keep_decisions=plan.output_keep_decisions,
            training_keep_masks=training_keep_masks,
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: DynamicLlavaCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        sparsity: "SparsitySettings | dict | bool | None" = None,
        num_generated_tokens: int = 0,
        prefill: bool = False,
        tokens_per_image: int | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        past_key_values: DynamicLlavaCache | None = None,
        **kwargs,
    ) -> DynamicLlavaModelOutputWithPast | tuple:
        r"""
        cache (`DynamicLlavaCache`, *optional*):
            The KV cache to read and fill; `past_key_values` is the same argument under its pre-5.24 name (both are
            accepted on every supported transformers release). An empty `DynamicCache` is replaced by a new one.
        sparsity (`SparsitySettings`, `dict` or `bool`, *optional*):
            This call's sparsification instead of the config's: `False` switches it off (plain LLaVA), a dict overrides
            fields of [`SparsitySettings`], e.g. `{"vision_selector": "fastv", "vision_keep_rate": 0.2}`.
        num_generated_tokens (`int`, *optional*, defaults to 0):
            Without a cache: the last `num_generated_tokens` inputs are model outputs, pruned by the output-text
            predictor as cached decoding would (the newest is always computed). `generate(use_cache=False)` sets it.
        prefill (`bool`, *optional*, defaults to `False`):
            The inputs are prompt tokens, even one token after a cached prefix (else a generated token, gated by the
            output-text predictor). `generate()` sets it for its prefill.
        tokens_per_image (`int`, *optional*):
            Image tokens per image, for image features that come as one block of several images (`generate()` passes
            each prefill chunk its share of the features that way, and sets this).
        labels (`torch.LongTensor`, *optional*):
            In training only: each row's last reply (its supervised tokens) is what the output-text predictor masks.
        """
        settings = resolve_sparsity(self, sparsity)
        self.check_inputs(input_ids, inputs_embeds, pixel_values, mm_encoder_outputs)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        cache, use_cache = self.resolve_cache(cache_argument(cache, past_key_values), use_cache)
        if training := self.training and settings.enabled:
            self.check_training_call(settings, cache is not None, inputs_embeds)

        step = self.start_step(inputs_embeds, attention_mask, position_ids, cache, num_generated_tokens, prefill)
        image_outputs = self.embed_images(
            step,
            input_ids,
            pixel_values,
            mm_encoder_outputs,
            tokens_per_image,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
        )
        self.start_outputs(step, output_hidden_states, output_attentions)

        # Layers below sparse_layer see the whole sequence and store every real token.
        below, above = self.layer_groups()
        self.run_layers(below, FULL_GROUP, step, cache, use_cache=use_cache, **kwargs)

        # At sparse_layer: decide what the later layers compute and store, or (training) sample the masks they apply.
        plan, training_keep_masks, key_keep = self.decide_at_sparse_layer(step, settings, training, labels, cache)
        step.apply(plan)

        # Layers from sparse_layer on, over the remaining tokens; then the norm, and every input position back.
        self.run_layers(above, SPARSE_GROUP, step, cache, key_keep, use_cache=use_cache, **kwargs)
        hidden_states = self.finish_step(step, cache)

        output = self.step_output(
            step, hidden_states, image_outputs, cache if use_cache else None, plan, training_keep_masks
        )
        return output if return_dict is not False else output.to_tuple()


class DynamicLlavaForConditionalGeneration(
    DynamicLlavaGenerationMixin, DynamicLlavaPreTrainedModel, LlavaForConditionalGeneration
):
    """Dynamic-LLaVA with a language-modeling head; use it like `LlavaForConditionalGeneration`."""

    _keep_in_fp32_modules = ("model.vision_tower", "model.multi_modal_projector")  # plus the predictors built

    def __init__(self, config):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = DynamicLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        # post_init added the bare model's names as they are; here they are paths under `model`.
        self._keep_in_fp32_modules = {f"model.{name}" for name in self.model._keep_in_fp32_modules}

    def compile_prefill(self, **torch_compile_kwargs) -> None:
        """Compiles the prefill's decoder-layer loops, vision tower and image predictor; see
        [`DynamicLlavaModel.compile_prefill`]."""
        self.model.compile_prefill(**torch_compile_kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: DynamicLlavaCache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        sparsity: "SparsitySettings | dict | bool | None" = None,
        num_generated_tokens: int = 0,
        prefill: bool = False,
        tokens_per_image: int | None = None,
        return_dict: bool | None = None,
        past_key_values: DynamicLlavaCache | None = None,
        **kwargs,
    ) -> DynamicLlavaCausalLMOutputWithPast | tuple:
        r"""
        Same as [`~transformers.LlavaForConditionalGeneration.forward`], plus `sparsity`, `num_generated_tokens`,
        `prefill` and `tokens_per_image` (see [`DynamicLlavaModel.forward`]). The cache may be passed as `cache` or
        `past_key_values`.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache_argument(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
            mm_encoder_outputs=mm_encoder_outputs,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            sparsity=sparsity,
            num_generated_tokens=num_generated_tokens,
            prefill=prefill,
            tokens_per_image=tokens_per_image,
            labels=labels,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        output = DynamicLlavaCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            **cache_and_image_fields(outputs.get(CACHE_NAME), outputs.get("image_outputs")),
            kept_image_token_indices=outputs.kept_image_token_indices,
            output_keep_decisions=outputs.output_keep_decisions,
        )
        if outputs.training_keep_masks is not None:
            settings = resolve_sparsity(self.model, sparsity)
            add_keep_rate_losses(output, outputs.training_keep_masks, self.config, settings)
        return output if return_dict is not False else output.to_tuple()


DynamicLlavaConfig.register_for_auto_class()
DynamicLlavaModel.register_for_auto_class("AutoModel")
DynamicLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "DynamicLlavaForConditionalGeneration",
    "DynamicLlavaModel",
    "DynamicLlavaPreTrainedModel",
    "DynamicLlavaImagePredictor",
    "DynamicLlavaTextPredictor",
    "DynamicLlavaModelOutputWithPast",
    "DynamicLlavaCausalLMOutputWithPast",
    "SparsitySettings",
    "TrainingKeepMasks",
]
