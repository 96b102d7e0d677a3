"""The three predictors of Dynamic-LLaVA, with the architecture and sub-module names of the official implementation
(so state-dict keys match it). Each maps hidden states to keep/drop logits: output index 0 = keep, 1 = drop.

Part of the remote-code bundle: imports only torch and transformers.
"""

import torch
import torch.nn.functional as F
from torch import nn


class PredictorAttention(nn.Module):
    """Bidirectional multi-head self-attention over one image's tokens (fused qkv without bias)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class PredictorMlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PredictorBlock(nn.Module):
    """Pre-norm transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = PredictorAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = PredictorMlp(dim, ffn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DynamicLlavaImagePredictor(nn.Module):
    """Scores the tokens of one image: `[images, tokens, hidden] -> [images, tokens, 2]` keep/drop logits.

    Half of each token's features stay local; the other half is averaged over the image (weighted by `policy`, the
    training-time keep mask) and broadcast, so every score sees the whole image.
    """

    def __init__(self, hidden_size: int, d_model: int, num_heads: int, ffn_dim: int, num_layers: int):
        super().__init__()
        self.down_mlp = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, d_model), nn.GELU())
        self.transformer = nn.ModuleList([PredictorBlock(d_model, num_heads, ffn_dim) for _ in range(num_layers)])
        self.output_mlp = nn.Sequential(
            nn.Linear(d_model, d_model // 2),
            nn.GELU(),
            nn.Linear(d_model // 2, d_model // 4),
            nn.GELU(),
            nn.Linear(d_model // 4, 2),
        )

    def forward(self, image_hidden_states: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        # The predictor may be kept in float32 while the decoder runs in float16 (`_keep_in_fp32_modules`).
        x = self.down_mlp(image_hidden_states.to(self.down_mlp[0].weight.dtype))
        if policy is not None:
            x = x * policy
        for block in self.transformer:
            x = block(x)
        local_features, global_features = x.chunk(2, dim=-1)
        if policy is None:
            global_features = global_features.mean(dim=1, keepdim=True)
        else:
            global_features = (global_features * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
        x = torch.cat([local_features, global_features.expand_as(local_features)], dim=-1)
        return self.output_mlp(x)


class DynamicLlavaTextPredictor(nn.Module):
    """Per-token keep/drop logits of text tokens (output-text and instruct predictors): `[..., H] -> [..., 2]`."""

    def __init__(self, hidden_size: int, d_model: int):
        super().__init__()
        self.output_mlp = nn.Sequential(
            nn.LayerNorm(hidden_size),
            nn.Linear(hidden_size, d_model),
            nn.GELU(),
            nn.Linear(d_model, d_model // 2),
            nn.GELU(),
            nn.Linear(d_model // 2, d_model // 4),
            nn.GELU(),
            nn.Linear(d_model // 4, 2),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The predictor may be kept in float32 while the decoder runs in float16 (`_keep_in_fp32_modules`).
        return self.output_mlp(hidden_states.to(self.output_mlp[0].weight.dtype))


__all__ = ["DynamicLlavaImagePredictor", "DynamicLlavaTextPredictor"]
