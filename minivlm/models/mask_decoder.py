"""SAM's mask decoder: prompt tokens + image embedding -> mask logits and IoU estimates.

A hand-written copy of segment-anything's `modeling/mask_decoder.py` (Kirillov et al. 2023,
"Segment Anything", §3) with the same constructor arguments, parameter names and `forward`,
so `MaskDecoder.load_state_dict(sam.mask_decoder.state_dict())` works as it is. LISA feeds it
the `[SEG]` token's projected hidden state as the only sparse prompt.

The decoder prepends learned output tokens (one IoU token, 1 + num_multimask_outputs mask
tokens) to the prompt tokens, runs the TwoWayTransformer against the image, upsamples the image
4x, and turns each mask token into per-pixel weights (a "hypernetwork" MLP):
mask = weights . pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minivlm.models.prompt_encoder import NoMaskPromptEncoder
from minivlm.models.two_way_transformer import TwoWayTransformer


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (SAM, from MaskFormer)."""

    def __init__(
        self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        hidden = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(n_in, n_out)
            for n_in, n_out in zip([input_dim] + hidden, hidden + [output_dim])
        )
        self.sigmoid_output = sigmoid_output

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (ConvNeXt / detectron2, used by SAM)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)  # (B, 1, H, W)
        var = (x - mean).pow(2).mean(1, keepdim=True)  # biased variance, as SAM
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MaskDecoder(nn.Module):
    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        # Token 0 is the single-mask output; tokens 1.. are the ambiguity-aware multimask outputs.
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        # Two stride-2 transposed convolutions: 4x the grid, 1/8 of the channels.
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool,
    ) -> tuple[Tensor, Tensor]:
        """Mask logits (B, M, 4H, 4W) and predicted IoUs (B, M) for B prompts.

        image_embeddings (1 or B, C, H, W), image_pe (1 or B, C, H, W), sparse (B, N, C),
        dense (B or 1, C, H, W). M = num_multimask_outputs, or 1 when not multimask_output.
        SAM repeats one image for all B prompts; a batch of B images (one per prompt, as in
        batched LISA training) is also accepted and used as it is.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        # SAM: token 0 answers unambiguous prompts, tokens 1.. cover ambiguous ones.
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, mask_slice], iou_pred[:, mask_slice]

    def predict_masks(
        self, image_embeddings: Tensor, image_pe: Tensor,
        sparse_prompt_embeddings: Tensor, dense_prompt_embeddings: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """All 1 + num_multimask_outputs masks and IoUs; `forward` picks the ones asked for."""
        num_prompts = sparse_prompt_embeddings.shape[0]

        # 1. Tokens: [iou, mask_0..mask_K, prompt tokens].
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])  # (1+T, C)
        output_tokens = output_tokens.unsqueeze(0).expand(num_prompts, -1, -1)  # (B, 1+T, C)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)  # (B, 1+T+N, C)

        # 2. One copy of the image per prompt, plus the dense prompt.
        src = _per_prompt(image_embeddings, num_prompts, "image_embeddings")  # (B, C, H, W)
        src = src + dense_prompt_embeddings
        pos_src = _per_prompt(image_pe, num_prompts, "image_pe")  # (B, C, H, W)
        batch, channels, height, width = src.shape

        # 3. Two-way transformer.
        hs, src = self.transformer(src, pos_src, tokens)  # (B, 1+T+N, C), (B, HW, C)
        iou_token_out = hs[:, 0, :]  # (B, C)
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]  # (B, T, C)

        # 4. Upscale the image and let each mask token weigh its channels.
        # (B, HW, C) -> (B, C, H, W)
        src = src.transpose(1, 2).reshape(batch, channels, height, width)
        upscaled_embedding = self.output_upscaling(src)  # (B, C/8, 4H, 4W)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )  # (B, T, C/8)
        batch, channels, height, width = upscaled_embedding.shape
        # (B, T, C/8) @ (B, C/8, 4H*4W) -> (B, T, 4H*4W)
        masks = hyper_in @ upscaled_embedding.reshape(batch, channels, height * width)
        masks = masks.reshape(batch, -1, height, width)  # (B, T, 4H, 4W)

        # 5. Each mask's IoU with the (unknown) truth, from the IoU token.
        iou_pred = self.iou_prediction_head(iou_token_out)  # (B, T)
        return masks, iou_pred


def _per_prompt(x: Tensor, num_prompts: int, name: str) -> Tensor:
    """(1, C, H, W) -> (B, C, H, W) as SAM's repeat_interleave; (B, C, H, W) passes through."""
    if x.shape[0] == num_prompts:
        return x
    if x.shape[0] == 1:
        return x.expand(num_prompts, -1, -1, -1)
    raise ValueError(
        f"MaskDecoder: {name} has batch {x.shape[0]}; expected 1 (shared image) or "
        f"{num_prompts} (one per sparse prompt)"
    )


@dataclass(frozen=True)
class MaskDecoderConfig:
    """Sizes of the mask decoder and its prompt pieces; defaults are a tiny CPU decoder."""

    transformer_dim: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 128
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 64


# Every SAM release (ViT-B/L/H) shares this decoder (segment_anything/build_sam.py).
MASK_DECODER_PRESETS: dict[str, MaskDecoderConfig] = {
    "sam": MaskDecoderConfig(
        transformer_dim=256, depth=2, num_heads=8, mlp_dim=2048, iou_head_hidden_dim=256
    ),
}


def build_mask_decoder(config: MaskDecoderConfig) -> tuple[MaskDecoder, NoMaskPromptEncoder]:
    """A randomly initialised decoder and prompt encoder, wired as segment-anything builds them."""
    decoder = MaskDecoder(
        transformer_dim=config.transformer_dim,
        transformer=TwoWayTransformer(
            depth=config.depth,
            embedding_dim=config.transformer_dim,
            num_heads=config.num_heads,
            mlp_dim=config.mlp_dim,
        ),
        num_multimask_outputs=config.num_multimask_outputs,
        iou_head_depth=config.iou_head_depth,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
    )
    return decoder, NoMaskPromptEncoder(config.transformer_dim)


def check_tensors(path: str | Path, found: dict[str, Tensor], expected: dict[str, Tensor],
                  sized_by: Callable[[str], str], prefix: str = "",
                  allow_extra: bool = False) -> None:
    """A strict load's checks, as one line naming the file and the first key that is missing,
    has another shape, or (unless `allow_extra`) is not ours; `sized_by(key)` names the config
    that fixes a key's shape. Shared by load_sam_mask_decoder and sam_checkpoint.load_sam."""
    for name, tensor in expected.items():
        if name not in found:
            raise ValueError(
                f"{path}: missing key '{prefix}{name}' (expected shape {tuple(tensor.shape)})"
            )
        if found[name].shape != tensor.shape:
            raise ValueError(
                f"{path}: key '{prefix}{name}' has shape {tuple(found[name].shape)}, "
                f"expected {tuple(tensor.shape)} for {sized_by(name)}"
            )
    unexpected = [name for name in found if name not in expected]
    if unexpected and not allow_extra:
        raise ValueError(f"{path}: unexpected key '{prefix}{unexpected[0]}' for "
                         f"{sized_by(unexpected[0])}")


def load_sam_mask_decoder(
    path: str | Path, config: MaskDecoderConfig = MASK_DECODER_PRESETS["sam"]
) -> tuple[MaskDecoder, NoMaskPromptEncoder]:
    """Decoder + prompt pieces from an original SAM checkpoint (e.g. sam_vit_b_01ec64.pth).

    Every `mask_decoder.*` tensor must be present with our shape and none may be left over;
    of `prompt_encoder.*` only `pe_layer.*` and `no_mask_embed.*` are read (LISA prompts with
    text, so SAM's point/box/mask encoders are not used).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(
            f"{path}: expected a state_dict (dict of tensors), found {type(state).__name__}"
        )
    decoder, prompt_encoder = build_mask_decoder(config)
    for prefix, module, strict_extras in (
        ("mask_decoder.", decoder, True),
        ("prompt_encoder.", prompt_encoder, False),
    ):
        expected = module.state_dict()
        found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not found:
            raise ValueError(f"{path}: no '{prefix}*' keys; expected an original SAM checkpoint")
        check_tensors(path, found, expected, lambda key: str(config), prefix,
                      allow_extra=not strict_extras)
        module.load_state_dict({name: found[name] for name in expected}, strict=True)
    return decoder, prompt_encoder
