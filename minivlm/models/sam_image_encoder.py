"""SAM's image encoder: a ViT with windowed attention, decomposed relative positions and a neck.

A hand-written copy of segment-anything's `modeling/image_encoder.py` (Kirillov et al. 2023,
"Segment Anything", §3), itself the ViTDet backbone (Li et al. 2022, "Exploring Plain Vision
Transformer Backbones for Object Detection"). Constructor arguments, parameter names and
state-dict keys are SAM's, so `ImageEncoderViT.load_state_dict(sam.image_encoder.state_dict())`
works as it is.

An (N, 3, S, S) image becomes an (S/p, S/p) grid of patch tokens (64 x 64 for SAM's 1024 px and
16 px patches). Most blocks attend inside non-overlapping windows (14 x 14 in SAM), a few
(`global_attn_indexes`) over the whole grid; every attention adds a relative-position bias
split into a height and a width term (MViTv2, Li et al. 2022). A conv neck maps the grid to
`out_chans` channels, the mask decoder's width: (N, out_chans, S/p, S/p).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minivlm.models.mask_decoder import LayerNorm2d
from minivlm.models.two_way_transformer import MLPBlock


class PatchEmbed(nn.Module):
    """Image -> patch tokens with one strided convolution, channels last (B, H, W, C)."""

    def __init__(
        self,
        kernel_size: tuple[int, int] = (16, 16),
        stride: tuple[int, int] = (16, 16),
        padding: tuple[int, int] = (0, 0),
        in_chans: int = 3,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (B, C, H, W) -> (B, H, W, C)


def window_partition(x: Tensor, window_size: int) -> tuple[Tensor, tuple[int, int]]:
    """(B, H, W, C) -> windows (B * nW, ws, ws, C) and the padded size (Hp, Wp).

    The grid is zero-padded at the bottom/right to a multiple of the window (SAM's 64 x 64 grid
    in 14 x 14 windows pads to 70 x 70); padded tokens take part in attention, as in SAM.
    """
    batch, height, width, channels = x.shape
    pad_h = (window_size - height % window_size) % window_size
    pad_w = (window_size - width % window_size) % window_size
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # (B, Hp, Wp, C)
    padded_h, padded_w = height + pad_h, width + pad_w
    # (B, Hp/ws, ws, Wp/ws, ws, C)
    x = x.view(batch, padded_h // window_size, window_size, padded_w // window_size, window_size,
               channels)
    # -> (B, Hp/ws, Wp/ws, ws, ws, C) -> (B * nW, ws, ws, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, channels)
    return windows, (padded_h, padded_w)


def window_unpartition(
    windows: Tensor, window_size: int, padded_size: tuple[int, int], size: tuple[int, int]
) -> Tensor:
    """Inverse of `window_partition`: (B * nW, ws, ws, C) -> (B, H, W, C), padding dropped."""
    padded_h, padded_w = padded_size
    height, width = size
    batch = windows.shape[0] // ((padded_h // window_size) * (padded_w // window_size))
    # (B, Hp/ws, Wp/ws, ws, ws, C)
    x = windows.view(batch, padded_h // window_size, padded_w // window_size, window_size,
                     window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, -1)  # (B, Hp, Wp, C)
    return x[:, :height, :width, :].contiguous()  # (B, H, W, C)


def get_rel_pos(size: int, rel_pos: Tensor) -> Tensor:
    """Embeddings of every (query, key) offset on one axis: (2*size-1, hd) -> (size, size, hd).

    Row `(i - j) + (size - 1)` of `rel_pos` embeds "the key is i - j cells before the query".
    SAM's version also resizes `rel_pos` for a grid of another size; SAM never reaches that
    branch (pos_embed fixes the grid), so a length mismatch is an error here.
    """
    if rel_pos.shape[0] != 2 * size - 1:
        raise ValueError(
            f"get_rel_pos: rel_pos has {rel_pos.shape[0]} rows, expected 2 * {size} - 1 for a "
            f"{size}-cell axis (the encoder runs at its img_size only)"
        )
    positions = torch.arange(size, device=rel_pos.device)
    offsets = positions[:, None] - positions[None, :] + (size - 1)  # (size, size) in [0, 2size-2]
    return rel_pos[offsets]  # (size, size, hd)


def decomposed_rel_pos_bias(
    q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, size: tuple[int, int]
) -> Tensor:
    """The attention bias of decomposed relative positions (MViTv2 eq. 4), as SAM adds it.

    q (B, nh, H*W, hd), unscaled as in SAM -> bias (B, nh, H*W, H*W) with
    bias[(h, w), (k_h, k_w)] = q[h, w] . Rh[h, k_h] + q[h, w] . Rw[w, k_w]:
    one term per axis instead of one embedding per 2-D offset.
    """
    height, width = size
    batch, num_heads, _, head_dim = q.shape
    rel_h = get_rel_pos(height, rel_pos_h)  # (H, H, hd)
    rel_w = get_rel_pos(width, rel_pos_w)  # (W, W, hd)
    q_grid = q.reshape(batch, num_heads, height, width, head_dim)  # (B, nh, H, W, hd)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, rel_h)  # (B, nh, H, W, H)
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, rel_w)  # (B, nh, H, W, W)
    bias = bias_h[..., :, None] + bias_w[..., None, :]  # (B, nh, H, W, H, W)
    return bias.reshape(batch, num_heads, height * width, height * width)


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid, with the decomposed rel-pos bias."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Attention: num_heads={num_heads} must divide dim={dim}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("Attention: use_rel_pos needs input_size (the grid or window)")
            # SAM accepts rel_pos_zero_init but always starts from zeros; so do we.
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, _ = x.shape
        # (B, H, W, 3C) -> (B, HW, 3, nh, hd) -> (3, B, nh, HW, hd)
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, HW, hd)
        bias = None
        if self.use_rel_pos:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (height, width))
        # softmax(q k^T / sqrt(hd) + bias) v; matches SAM's explicit softmax within 1e-6.
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, nh, HW, hd)
        x = x.transpose(1, 2).reshape(batch, height, width, -1)  # (B, H, W, C)
        return self.proj(x)


class Block(nn.Module):
    """Pre-norm transformer block; attention inside windows when window_size > 0, else global."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_zero_init=rel_pos_zero_init,
            # A windowed block's offsets span one window, a global block's the whole grid.
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.norm1(x)  # (B, H, W, C)
        if self.window_size > 0:
            height, width = x.shape[1], x.shape[2]
            x, padded_size = window_partition(x, self.window_size)  # (B * nW, ws, ws, C)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, padded_size, (height, width))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        global_attn_indexes: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size  # not in SAM's class; the grid is img_size // patch_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(
            kernel_size=(patch_size, patch_size),
            stride=(patch_size, patch_size),
            in_chans=in_chans,
            embed_dim=embed_dim,
        )
        self.pos_embed: nn.Parameter | None = None
        if use_abs_pos:
            # One learned embedding per patch of the pretraining grid, channels last as the tokens.
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_layer=norm_layer,
                act_layer=act_layer,
                use_rel_pos=use_rel_pos,
                rel_pos_zero_init=rel_pos_zero_init,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        # Neck: 1x1 conv to the decoder's width, then a 3x3 conv; no biases (LayerNorm2d has them).
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, S, S) normalised, padded pixels -> (N, out_chans, S/p, S/p)."""
        x = self.patch_embed(x)  # (N, S/p, S/p, C)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)  # (N, S/p, S/p, C)
        return self.neck(x.permute(0, 3, 1, 2))  # (N, C, S/p, S/p) -> (N, out_chans, S/p, S/p)
