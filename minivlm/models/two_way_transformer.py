"""SAM's two-way transformer: prompt tokens and image patches attend to each other.

A hand-written copy of segment-anything's `modeling/transformer.py` (Kirillov et al. 2023,
"Segment Anything", §3 and Fig. 14) with the same module and parameter names, so a SAM
checkpoint loads by stripping the `mask_decoder.transformer.` prefix. Each block runs four
steps on two streams, sparse `queries` (prompt + output tokens) and dense `keys` (image):
  1. self-attention of the queries,
  2. queries attend to the image ("token to image"),
  3. an MLP on the queries,
  4. the image attends to the queries ("image to token").
Positional encodings are re-added to q and k before every attention (never to v), as in SAM.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class MLPBlock(nn.Module):
    """Linear -> activation -> Linear; SAM's `common.MLPBlock` (names `lin1`, `lin2`)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(self.act(self.lin1(x)))


class Attention(nn.Module):
    """Multi-head attention whose q/k/v live in `embedding_dim // downsample_rate` channels.

    SAM halves the internal width of the two cross-attentions (downsample_rate=2) because the
    image side has 64x64 = 4096 tokens: it halves their cost while the output projection
    brings the result back to `embedding_dim`.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads != 0:
            raise ValueError(
                f"Attention: num_heads={num_heads} must divide the internal width "
                f"{embedding_dim} // {downsample_rate} = {self.internal_dim}"
            )
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _separate_heads(self, x: Tensor) -> Tensor:
        batch, num_tokens, channels = x.shape
        head_size = channels // self.num_heads
        x = x.reshape(batch, num_tokens, self.num_heads, head_size)  # (B, N, nh, hs)
        return x.transpose(1, 2)  # (B, nh, N, hs)

    def _recombine_heads(self, x: Tensor) -> Tensor:
        batch, num_heads, num_tokens, head_size = x.shape
        x = x.transpose(1, 2)  # (B, N, nh, hs)
        return x.reshape(batch, num_tokens, num_heads * head_size)  # (B, N, internal_dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q = self._separate_heads(self.q_proj(q))  # (B, Nq, nh, hs) -> (B, nh, Nq, hs)
        k = self._separate_heads(self.k_proj(k))  # (B, nh, Nk, hs)
        v = self._separate_heads(self.v_proj(v))  # (B, nh, Nk, hs)
        # softmax(q @ k^T / sqrt(hs)) @ v, exactly SAM's math; the fused kernel avoids
        # materialising the (B, nh, 4096, Nq) score matrix of the image-to-token step.
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, Nq, hs)
        return self.out_proj(self._recombine_heads(out))  # (B, Nq, embedding_dim)


class TwoWayAttentionBlock(nn.Module):
    """One block of the four steps listed in the module docstring, post-norm as in SAM."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor
    ) -> tuple[Tensor, Tensor]:
        # queries: (B, Nq, C) tokens; keys: (B, HW, C) image; *_pe: their positional encodings.
        # 1. Self-attention. SAM's first block has no residual here: the queries still equal
        #    query_pe (the initial tokens are their own PE), so it replaces them outright.
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        # 2. Tokens attend to the image.
        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys))

        # 3. MLP on the tokens.
        queries = self.norm3(queries + self.mlp(queries))

        # 4. The image attends to the tokens (roles of q and k swapped).
        q = queries + query_pe
        k = keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """`depth` two-way blocks, then a last token-to-image attention and LayerNorm (SAM)."""

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor
    ) -> tuple[Tensor, Tensor]:
        """image_embedding, image_pe: (B, C, H, W); point_embedding: (B, Nq, C).

        Returns the processed tokens (B, Nq, C) and image (B, HW, C).
        """
        image_embedding = image_embedding.flatten(2).permute(0, 2, 1)  # (B, C, H, W) -> (B, HW, C)
        image_pe = image_pe.flatten(2).permute(0, 2, 1)  # (B, HW, C)

        # The input tokens double as the queries' positional encoding in every block (SAM).
        queries, keys = point_embedding, image_embedding
        for layer in self.layers:
            queries, keys = layer(
                queries=queries, keys=keys, query_pe=point_embedding, key_pe=image_pe
            )

        q = queries + point_embedding
        k = keys + image_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q=q, k=k, v=keys))
        return queries, keys
