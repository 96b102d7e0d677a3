"""How Dynamic-LLaVA plugs into `generate()`: its own caches (the dynamic default, or the fixed-capacity one for
`cache_implementation="static"`), prefill marked as prompt, what it refuses up front."""

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMode

from .cache_dynamic_llava import DynamicLlavaCache
from .compat_dynamic_llava import CACHE_NAME
from .static_cache_dynamic_llava import DynamicLlavaStaticCache
from .sparsity_dynamic_llava import SparsitySettings, resolve_sparsity


class DynamicLlavaGenerationMixin:
    """`generate()` hooks of `DynamicLlavaForConditionalGeneration` (placed before transformers' GenerationMixin)."""

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, *args, **kwargs):
        if generation_mode == GenerationMode.ASSISTED_GENERATION:
            self.check_assisted_decoding(resolve_sparsity(self.model, model_kwargs.get("sparsity")))
        # generate()'s own estimate of the tokens the cache will see (prompt + new tokens).
        max_cache_length = kwargs.get("max_cache_length", args[1] if len(args) > 1 else 0)
        if generation_config.max_cache_len is not None:
            max_cache_length = max(max_cache_length, generation_config.max_cache_len)
        user_cache = model_kwargs.get(CACHE_NAME)
        if generation_config.cache_implementation == "static":
            if user_cache is not None:
                raise ValueError("Pass either a cache or cache_implementation, not both")
            if generation_config.use_cache is not False:
                model_kwargs[CACHE_NAME] = DynamicLlavaStaticCache(self.config, max_cache_len=max_cache_length)
            return
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported by Dynamic-LLaVA, "
                "which needs its own cache (a different set of tokens per layer and row): leave cache_implementation "
                'unset (the memory-saving DynamicLlavaCache) or pass "static" (fixed-capacity, compileable).'
            )
        super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, *args, **kwargs)
        cache = model_kwargs.get(CACHE_NAME)
        if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
            cache = model_kwargs[CACHE_NAME] = DynamicLlavaCache(self.config)
        if isinstance(cache, DynamicLlavaStaticCache):  # passed back for a later turn: room for its tokens too
            cache.reserve(max_cache_length)
        elif isinstance(cache, DynamicLlavaCache) and max_cache_length:
            cache.expected_tokens = max_cache_length  # its buffers grow no further than this generation can reach

    def prepare_inputs_for_generation(self, *args, **kwargs):
        cache = kwargs.get(CACHE_NAME)
        if isinstance(cache, DynamicLlavaStaticCache):
            cache.plan_decoding_step()  # host-side, so that the compiled step reads no host state that changes
        return super().prepare_inputs_for_generation(*args, **kwargs)

    def init_continuous_batching(self, *args, **kwargs):
        """Refuses continuous batching (`generate_batch`, `continuous_batching_context_manager` and `transformers
        serve --continuous-batching` all start here) before any request runs: transformers would otherwise report
        every request as failed and return empty outputs, because its paged cache cannot hold what this model keeps."""
        raise NotImplementedError(
            "Continuous batching (generate_batch / init_continuous_batching) is not supported by Dynamic-LLaVA: "
            "transformers' paged cache keeps one set of tokens per request for all layers, while Dynamic-LLaVA keeps "
            "a different set per layer and row (image tokens pruned and generated tokens dropped from sparse_layer "
            "on). Use generate() on a left-padded batch instead; it frees the dropped entries as it goes."
        )

    def create_masks_for_generate(self, config=None, inputs_embeds=None, attention_mask=None, *args, **kwargs):
        """What `generate()` passes as the attention mask with a compileable cache: the current tokens' columns of the
        2D padding mask, which is all the model reads (it builds its masks from the cache), so that a decoding step's
        inputs keep their shape instead of growing by one column per step."""
        if attention_mask is None or attention_mask.dim() != 2:
            return attention_mask
        return attention_mask[:, -inputs_embeds.shape[1] :]

    @staticmethod
    def check_assisted_decoding(settings: SparsitySettings) -> None:
        """Refuses assisted/prompt-lookup decoding where it would not give plain decoding's tokens.

        The cache rolls rejected candidates back exactly, but the model verifies candidates several at a time, as
        prompt text: the output-text predictor gates only tokens fed one at a time, the instruct predictor prunes
        text that follows a cached prefix, and the FastV selector ranks images by the text after them (candidates
        included). Without those, each token sees what plain decoding shows it.
        """
        blockers = []
        if settings.use_output_text_predictor:
            blockers.append("use_output_text_predictor")
        if settings.use_instruct_predictor:
            blockers.append("use_instruct_predictor")
        if settings.use_vision_predictor and settings.vision_selector == "fastv":
            blockers.append("vision_selector='fastv'")
        if blockers:
            raise ValueError(
                "Assisted/speculative and prompt-lookup decoding verify several candidate tokens in one forward, "
                f"which Dynamic-LLaVA cannot treat as plain decoding does with {', '.join(blockers)}. They work with "
                "sparsification off or image pruning only, e.g. sparsity={'use_output_text_predictor': False, "
                "'use_instruct_predictor': False} (image selector 'learned' or 'random')."
            )

    def _prefill(self, input_ids, generation_config, model_kwargs, *args, **kwargs):
        added = {"prefill": True}  # all of it is prompt, even a 1-token chunk: no output-text gating
        if generation_config.prefill_chunk_size is not None:
            self.check_prefill_chunks(input_ids, model_kwargs, generation_config.prefill_chunk_size)
            encoded = (model_kwargs.get("mm_encoder_outputs") or {}).get("image")
            if encoded is not None:  # chunks get their images' features in one block: say how to regroup them
                added["tokens_per_image"] = len(encoded.pooler_output[0])
        model_kwargs.update(added)
        try:
            return super()._prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)
        finally:
            for key in added:
                model_kwargs.pop(key, None)

    def check_prefill_chunks(self, input_ids: torch.LongTensor, model_kwargs: dict, chunk_size: int) -> None:
        """Refuses, before anything runs, a chunked prefill whose result would differ from the whole prompt's.

        Chunks are exact when each image lies inside one chunk: the image predictor ranks an image's tokens together
        at `sparse_layer`. The instruct predictor (text after the last image) and the random and FastV selectors (one
        random draw per call; the text after the image ranks it) judge the whole prompt at once, so with them the
        prompt must be one chunk.
        """
        cache = model_kwargs.get(CACHE_NAME)
        past = cache.get_seq_length() if cache is not None else 0
        mask = model_kwargs.get("attention_mask")
        prompt = input_ids[:, past:] if mask is not None and mask.shape[1] == input_ids.shape[1] else input_ids
        if prompt.shape[1] <= chunk_size:
            return
        settings = resolve_sparsity(self.model, model_kwargs.get("sparsity"))
        image_mask = prompt == self.config.image_token_id
        whole_prompt = f"pass prefill_chunk_size >= {prompt.shape[1]} (the prompt's length) or no prefill_chunk_size"
        if settings.use_instruct_predictor:
            raise ValueError(
                "Chunked prefill is not supported with the instruct predictor, which prunes the prompt text after the "
                f"images as a whole: {whole_prompt}, or switch it off with "
                "sparsity={'use_instruct_predictor': False}."
            )
        if not (settings.use_vision_predictor and bool(image_mask.any())):
            return
        if settings.vision_selector != "learned":
            raise ValueError(
                f"Chunked prefill is not supported with vision_selector={settings.vision_selector!r}, which ranks "
                f"each image against the whole prompt: {whole_prompt}."
            )
        encoded = (model_kwargs.get("mm_encoder_outputs") or {}).get("image")
        tokens_per_image = len(encoded.pooler_output[0]) if encoded is not None else self.config.image_seq_length
        for row, positions in enumerate(image_mask.nonzero()[:, 1].split(image_mask.sum(-1).tolist())):
            if len(positions) % tokens_per_image:
                continue  # the forward reports the wrong image-token count with its own error
            for image, (first, last) in enumerate(positions.view(-1, tokens_per_image)[:, [0, -1]].tolist()):
                if first // chunk_size != last // chunk_size:
                    last_image_end = int(image_mask.nonzero()[:, 1].max()) + 1
                    raise ValueError(
                        f"prefill_chunk_size={chunk_size} splits image {image} of row {row} (prompt positions {first} "
                        f"to {last}) across two chunks. Dynamic-LLaVA prunes each image's tokens together at "
                        "sparse_layer, so every image must lie inside one chunk: pick a chunk size whose boundaries "
                        f"(multiples of it) fall outside every image, e.g. prefill_chunk_size >= {last_image_end} "
                        "(all images in the first chunk), or switch image pruning off with "
                        "sparsity={'use_vision_predictor': False}."
                    )

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if model_kwargs.get(CACHE_NAME) is None:
            # Without a cache every step re-reads prompt + outputs; the model needs to know which tokens are outputs.
            num_new_tokens = kwargs.get("num_new_tokens", args[1] if len(args) > 1 else 1)
            model_kwargs["num_generated_tokens"] = model_kwargs.get("num_generated_tokens", 0) + num_new_tokens
        return model_kwargs
