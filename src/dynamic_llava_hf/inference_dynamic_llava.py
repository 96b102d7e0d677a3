"""Dynamic-LLaVA's inference decisions at `sparse_layer`: which tokens the later layers compute and store.

Image tokens: the top `vision_keep_rate` of each image by a selector's scores (the learned image predictor, or a random
or FastV-style baseline); the rest are removed. Prompt text after the image (instruct predictor, off by default) and
generated tokens (output-text predictor) are kept iff logit_keep > logit_drop; a generated token that is not kept is
computed but never stored. The decisions come as a `SparseLayerPlan`, which `DecoderStep.apply` carries out.

Part of the remote-code bundle: imports only torch, transformers and its sibling files.
"""

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .sparsity_dynamic_llava import DecoderStep, SparseLayerPlan, SparsitySettings


def keep_decision(logits: torch.Tensor) -> torch.Tensor:
    """Keep iff logit_keep > logit_drop (strict), as in the official inference code."""
    return logits[..., 0] > logits[..., 1]


def select_image_tokens(
    scores: torch.Tensor,
    image_mask: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    keep_rate: float,
    images_per_row: list[int] | None = None,
) -> tuple[torch.Tensor, list[torch.LongTensor]]:
    """Keeps the top-k tokens of each image by `scores` (`[num_images, tokens_per_image]`), k =
    floor(tokens_per_image * keep_rate); shared by every vision selector. `images_per_row`: where the caller knows
    them on the host (else they are read).

    Returns the `[batch, seq]` mask of dropped image tokens and, per row, the kept indices into the row's image
    tokens (ascending).
    """
    num_images, tokens_per_image = scores.shape
    kept = scores.topk(int(tokens_per_image * keep_rate), dim=-1).indices.sort(dim=-1).values  # [num_images, k]

    keep_image_token = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, kept, True)
    dropped = torch.zeros_like(image_mask)
    dropped[rows, cols] = ~keep_image_token

    # Indices into each row's image tokens: image j of a row starts at j * tokens_per_image. (On the device: a tensor
    # made from host values would wait for the queued work as a read does.)
    images_in_row = image_mask.sum(-1) // tokens_per_image
    first_image_of_row = images_in_row.cumsum(0) - images_in_row
    image_rank_in_row = torch.arange(num_images, device=kept.device) - first_image_of_row[rows[:, 0]]
    if images_per_row is None:
        images_per_row = images_in_row.tolist()
    row_indices = (kept + image_rank_in_row[:, None] * tokens_per_image).split(images_per_row)
    return dropped, [indices.reshape(-1) for indices in row_indices]


def instruction_queries(image_mask: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """`[batch, seq]`: the queries whose attention ranks a row's image tokens for `"fastv"`: the row's prompt tokens
    after its last image, or its last prompt token if none follows; none in rows without an image."""
    columns = torch.arange(prompt.shape[1], device=prompt.device)
    last_image = torch.where(image_mask, columns, -1).amax(-1, keepdim=True)
    has_image = last_image >= 0
    after_image = prompt & (columns > last_image) & has_image
    last_prompt_token = (columns == torch.where(prompt, columns, -1).amax(-1, keepdim=True)) & has_image
    return torch.where(after_image.any(-1, keepdim=True), after_image, last_prompt_token)


class InferenceDecisionsMixin:
    """The inference decisions of `DynamicLlavaModel` (a mixin: they read its config, predictors and layers)."""

    def plan_sparse_layer(self, step: DecoderStep, settings: SparsitySettings) -> SparseLayerPlan:
        """Applies the predictors to the input of `sparse_layer` and decides what the later layers see and store."""
        plan = SparseLayerPlan.keep_all(step.valid)
        if not settings.enabled:
            return plan
        if settings.use_vision_predictor and step.split_images:
            raise ValueError(
                "This input holds only part of an image (a prefill chunk boundary falls inside it), but image pruning "
                "ranks each image's tokens together: feed every image whole, or switch image pruning off."
            )
        if settings.use_vision_predictor and step.tokens_per_image is not None:
            self.prune_image_tokens(plan, step, settings)
        if settings.use_instruct_predictor:
            self.prune_instruction(plan, step)
        if settings.use_output_text_predictor and (step.num_generated_tokens > 1 or step.decoding):
            self.gate_output_text(plan, step)
        return plan

    def prune_image_tokens(self, plan: SparseLayerPlan, step: DecoderStep, settings: SparsitySettings) -> None:
        """Keeps the top `vision_keep_rate` of each image's tokens by the selector's scores; removes the rest."""
        rows, cols = step.image_token_coordinates()
        scores = self.image_token_scores(
            settings,
            step.hidden_states,
            rows,
            cols,
            image_mask=step.image_mask,
            prompt=step.prompt,
            valid=step.valid,
            position_embeddings=step.position_embeddings,
        )
        counts = step.counts
        images_per_row = None if counts is None else [n // step.tokens_per_image for n in counts.image_tokens]
        dropped, plan.kept_image_token_indices = select_image_tokens(
            scores, step.image_mask, rows, cols, settings.vision_keep_rate, images_per_row
        )
        # The kept indices' lengths are known on the host: a row loses the rest of its image tokens.
        removed = (
            None
            if counts is None
            else [n - len(kept) for n, kept in zip(counts.image_tokens, plan.kept_image_token_indices)]
        )
        plan.remove(dropped, removed)

    def prune_instruction(self, plan: SparseLayerPlan, step: DecoderStep) -> None:
        """Drops the prompt text the instruct predictor rejects (never the last prompt token)."""
        instruct_keep = keep_decision(self.instruct_score_predictor(step.hidden_states))
        columns = torch.arange(step.num_new, device=step.valid.device)
        prompt_end = step.num_new - step.num_generated_tokens
        text = step.valid & ~step.image_mask & (columns < prompt_end - 1)
        if step.has_past:
            # A later turn: its tokens see each other now; only the kept ones are stored.
            plan.skip_storing(text & ~instruct_keep)
        else:
            # Prompt text after each row's last image is pruned like the image tokens.
            last_image = torch.where(step.image_mask, columns, -1).amax(-1, keepdim=True)
            after_image = (columns > last_image) & (last_image >= 0)
            plan.remove(text & after_image & ~instruct_keep)

    def output_text_keep(self, step: DecoderStep) -> torch.Tensor:
        """`[batch, new_tokens]`: whether the output-text predictor keeps each token's K/V."""
        return keep_decision(self.output_text_score_predictor(step.hidden_states))

    def gate_output_text(self, plan: SparseLayerPlan, step: DecoderStep) -> None:
        """Keeps a generated token's K/V for later steps iff `output_text_keep` says so."""
        output_keep = self.output_text_keep(step)
        if step.has_past:
            # Decoding with a cache: the new token sees itself now and is stored only if kept.
            plan.skip_storing(~output_keep)
            plan.output_keep_decisions = output_keep
        else:
            # Decoding without a cache: earlier generated tokens the predictor dropped are gone; the newest one is
            # being computed and stays.
            columns = torch.arange(step.num_new, device=step.valid.device)
            prompt_end = step.num_new - step.num_generated_tokens
            judged = (columns >= prompt_end) & (columns < step.num_new - 1)
            plan.remove(judged & ~output_keep)
            plan.output_keep_decisions = output_keep[:, prompt_end:]

    def image_token_scores(
        self,
        settings: SparsitySettings,
        hidden_states: torch.Tensor,
        rows: torch.LongTensor,
        cols: torch.LongTensor,
        *,
        image_mask: torch.Tensor,
        prompt: torch.Tensor,
        valid: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """`[num_images, tokens_per_image]` keep scores of each image's tokens (higher is kept first).

        `hidden_states` is the input of `sparse_layer`; `rows`/`cols` locate each image's tokens (see
        `image_token_coordinates`); `prompt` marks the valid prompt tokens (not padding, not generated outputs). By
        `settings.vision_selector`:

        - `"learned"`: the image predictor's log-softmax keep score (the method).
        - `"random"`: uniform random scores from a CPU `torch.Generator` seeded with `vision_selector_seed`, one row
          per image in batch order; the same seed keeps the same tokens of the same batch.
        - `"fastv"`: training-free, FastV-style: the attention each image token receives in `sparse_layer`, recomputed
          from that layer's queries and keys (see `attention_received`), so it works with any attention
          implementation. FastV averages over heads and all queries; we average over heads and the row's text queries
          that follow its last image (the instruction, which sees every image token), falling back to the row's last
          prompt token. That avoids the causal bias towards early image tokens, which more queries can see. Only
          prompt tokens query, so decoding without a cache keeps the same tokens as the cached prefill; with a cache,
          the keys are the current forward's tokens (a later turn's new image is ranked without the past).
        """
        if settings.vision_selector == "learned":
            logits = self.image_score_predictor(hidden_states[rows, cols])
            return torch.log_softmax(logits.float(), dim=-1)[..., 0]
        if settings.vision_selector == "random":
            generator = torch.Generator().manual_seed(settings.vision_selector_seed)
            return torch.rand(rows.shape, generator=generator).to(rows.device)
        queries = instruction_queries(image_mask, prompt)
        return self.attention_received(hidden_states, valid, queries, position_embeddings)[rows, cols]

    def attention_received(
        self,
        hidden_states: torch.Tensor,
        valid: torch.Tensor,
        queries: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """`[batch, seq]`: attention each token receives in `sparse_layer` from its row's `queries` (`[batch, seq]`
        bool), averaged over heads and those queries (0 in rows without queries).

        Recomputed from the layer's own weights: `input_layernorm`, `q_proj`/`k_proj`, RoPE, kv heads repeated for
        GQA, scaled dot products under the causal and padding masks, softmax over keys in float32. Memory:
        `[batch, heads, max queries per row, seq]`.
        """
        layer = self.language_model.layers[self.config.sparse_layer]
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden_states)
        head_shape = (*normed.shape[:2], -1, attention.head_dim)
        query = attention.q_proj(normed).view(head_shape).transpose(1, 2)
        key = attention.k_proj(normed).view(head_shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        key = key.repeat_interleave(attention.num_key_value_groups, dim=1)

        # Each row's queries, left-aligned: positions [batch, width] (slots past a row's count are unused).
        num_queries = queries.sum(-1)
        width = int(num_queries.max())
        positions = torch.sort(~queries, dim=-1, stable=True).indices[:, :width]
        used = torch.arange(width, device=queries.device)[None] < num_queries[:, None]
        query = torch.gather(query, 2, positions[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[-1]))

        logits = (query.float() @ key.float().transpose(-1, -2)) * attention.scaling  # [batch, heads, width, seq]
        columns = torch.arange(valid.shape[1], device=valid.device)
        allowed = ((columns <= positions[..., None]) & valid[:, None, :]) | (columns == positions[..., None])
        weights = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
        weights = torch.where(used[:, None, :, None], weights, 0.0)
        return weights.sum(dim=(1, 2)) / (num_queries * weights.shape[1]).clamp(min=1)[:, None]
