"""An independent, mask-based Dynamic-LLaVA: nothing is removed, dropped tokens are masked as keys instead.

Every forward recomputes the whole sequence. Layers below `sparse_layer` use plain causal attention over the real
(non-padding) tokens; layers from `sparse_layer` on additionally hide the keys of dropped tokens (image tokens outside
each image's top-k, generated tokens the output-text predictor drops), except that every token sees itself. This is
the semantics the physical pruning and the ragged cache must reproduce.
"""

import torch


def generation_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as transformers' generate() computes them (pads at 0)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def _mask(allowed: torch.Tensor, implementation: str, dtype) -> torch.Tensor:
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


@torch.no_grad()
def reference_forward(model, input_ids, attention_mask, pixel_values, num_generated=0, keep_rate=None):
    """Logits `[B, L, V]` and the keep-key mask `[B, L]` of the mask-based computation."""
    inner = model.model
    config = model.config
    implementation = config.text_config._attn_implementation
    keep_rate = config.vision_keep_rate if keep_rate is None else keep_rate
    embeds = inner.get_input_embeddings()(input_ids)
    image_mask = input_ids == config.image_token_id
    if pixel_values is not None:
        features = torch.cat(list(inner.get_image_features(pixel_values=pixel_values).pooler_output))
        embeds = embeds.masked_scatter(image_mask[..., None], features)
    batch, length = input_ids.shape
    valid = attention_mask.bool()
    positions = generation_positions(attention_mask)
    cos_sin = inner.language_model.rotary_emb(embeds, positions)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    eye = torch.eye(length, dtype=torch.bool)

    hidden = embeds
    keep_keys = valid.clone()
    layers = inner.language_model.layers
    for index, layer in enumerate(layers):
        if index == config.sparse_layer:
            keep_keys = valid & _decisions(inner, hidden, image_mask, keep_rate, num_generated)
        allowed = (causal[None] & keep_keys[:, None, :]) | eye[None]
        hidden = layer(
            hidden, attention_mask=_mask(allowed[:, None], implementation, hidden.dtype), position_embeddings=cos_sin
        )
    logits = model.lm_head(inner.language_model.norm(hidden))
    return logits, keep_keys


def _decisions(inner, hidden, image_mask, keep_rate, num_generated):
    """Which tokens stay visible as keys from the sparse layer on (True = keep)."""
    batch, length, _ = hidden.shape
    keep = torch.ones(batch, length, dtype=torch.bool)
    tokens_per_image = inner.config.image_seq_length
    for row in range(batch):  # a plain loop: this is the readable reference, not the implementation
        positions = image_mask[row].nonzero().flatten()
        for start in range(0, len(positions), tokens_per_image):
            image_positions = positions[start : start + tokens_per_image]
            logits = inner.image_score_predictor(hidden[row, image_positions][None])[0]
            scores = torch.log_softmax(logits, -1)[:, 0]
            kept = scores.topk(int(tokens_per_image * keep_rate)).indices
            keep[row, image_positions] = False
            keep[row, image_positions[kept]] = True
    if num_generated > 1:
        logits = inner.output_text_score_predictor(hidden[:, length - num_generated : length - 1])
        keep[:, length - num_generated : length - 1] = logits[..., 0] > logits[..., 1]
    return keep


@torch.no_grad()
def reference_greedy(model, input_ids, attention_mask, pixel_values, max_new_tokens):
    """Greedy decoding by full recomputation each step; returns new tokens `[B, T]` and step logits `[T, B, V]`."""
    tokens, step_logits = [], []
    for step in range(max_new_tokens):
        logits, _ = reference_forward(model, input_ids, attention_mask, pixel_values, num_generated=step)
        last = logits[:, -1]
        step_logits.append(last)
        next_token = last.argmax(-1, keepdim=True)
        tokens.append(next_token)
        input_ids = torch.cat([input_ids, next_token], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
    return torch.cat(tokens, dim=1), torch.stack(step_logits)
