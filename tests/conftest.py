"""Shared fixtures: a tiny synthetic dataset, a tokenizer trained on it, a tiny VLM checkpoint."""
from pathlib import Path

import pytest
import torch

import demo  # the top-level script (pytest runs from the repo root)

from minivlm.data.shapes.config import ShapesConfig
from minivlm.data.shapes.generate import generate
from minivlm.data.load_tokenizer import load_tokenizer
from minivlm.data.sentencepiece_tokenizer import train_sentencepiece
from minivlm.models.build import build_vlm
from minivlm.models.presets import preset_config
from minivlm.train.checkpoint import save_checkpoint
from minivlm.train.distributed import init_distributed
from minivlm.train_tokenizer import dataset_texts


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate(out, seed=0, config=ShapesConfig.quick())
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(shapes_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    texts = dataset_texts([str(shapes_dir / "pretrain.json"), str(shapes_dir / "sft.json")])
    train_sentencepiece(texts * 4, out, vocab_size=360)
    return out


def tiny_vlm_config(seg: bool = True):
    return preset_config("test", seg=seg)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """A saved, randomly initialised tiny VLM (with a segmentation head): a run directory."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    model = build_vlm(tiny_vlm_config(), tokenizer)
    out = tmp_path_factory.mktemp("tiny_run")
    save_checkpoint(out, 0, model=model, config={"stage": "test", "model": model.config.to_dict(),
                                                 "lora": None},
                    tokenizer=tokenizer, trainer_state={"scaler": {}},
                    optimizer=torch.optim.AdamW(model.parameters()), env=init_distributed(False))
    return out


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory) -> tuple[Path, dict]:
    """`demo.py --quick` run once for the session: (its --out folder, its results). The trained
    model is `out / "runs" / "seg"` (a tiny VLM that went through every stage)."""
    out = tmp_path_factory.mktemp("quick_demo")
    return out, demo.main(["--quick", "--out", str(out)])
