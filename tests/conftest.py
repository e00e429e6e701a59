"""Shared fixtures: a tiny synthetic dataset, a tokenizer trained on it, a tiny VLM checkpoint."""
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    from minivlm.data.shapes import ShapesConfig, generate
    out = tmp_path_factory.mktemp("shapes")
    generate(out, seed=0, config=ShapesConfig.quick())
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(shapes_dir, tmp_path_factory) -> Path:
    from minivlm.data.tokenizer import train_sentencepiece
    from minivlm.train_tokenizer import dataset_texts
    out = tmp_path_factory.mktemp("tokenizer")
    texts = dataset_texts([str(shapes_dir / "pretrain.json"), str(shapes_dir / "sft.json")])
    train_sentencepiece(texts * 4, out, vocab_size=360)
    return out


def tiny_vlm_config(seg: bool = True):
    from minivlm.models.projector import ProjectorConfig
    from minivlm.models.seg_head import SegConfig
    from minivlm.models.transformer import TransformerConfig
    from minivlm.models.vision import VisionConfig
    from minivlm.models.vlm import VLMConfig
    return VLMConfig(
        lm=TransformerConfig(dim=32, num_layers=2, num_heads=4, num_kv_heads=2, hidden_dim=64,
                             max_seq_len=512),
        vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=1, head_width=16),
        projector=ProjectorConfig(kind="pixel_shuffle", merge=2),
        seg=SegConfig(enabled=seg, decoder_dim=16, decoder_heads=2, decoder_mlp_dim=32,
                      iou_head_hidden_dim=16))


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """A saved, randomly initialised tiny VLM (with a segmentation head): a run directory."""
    from minivlm.models.build import build_vlm
    from minivlm.train.checkpoint import save_checkpoint
    from minivlm.train.distributed import init_distributed
    from minivlm.data.tokenizer import load_tokenizer
    torch.manual_seed(0)
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    model = build_vlm(tiny_vlm_config(), tokenizer)
    out = tmp_path_factory.mktemp("tiny_run")
    save_checkpoint(out, 0, model=model, config={"stage": "test", "model": model.config.to_dict(),
                                                 "lora": None},
                    tokenizer=tokenizer, trainer_state={"scaler": {}},
                    optimizer=torch.optim.AdamW(model.parameters()), env=init_distributed(False))
    return out
