"""Stage 3 — reasoning segmentation (LISA): answer "Sure, it is [SEG]." and decode its mask.

The hidden state that predicts [SEG] prompts a SAM-style mask decoder; loss = CE x 1.0 +
BCE x 2.0 + Dice x 0.5. Trains LoRA adapters + text_hidden_fcs + the mask decoder (+ the
embeddings of new tokens; the list is trainable.SEG_LORA_EXTRAS) by default, on a hybrid of
datasets drawn with `--sample-rates` (reason_seg, vqa and caption data keep the model's language
while it learns masks). Usage:

    python train_seg.py --init-from runs/sft \
        --data data/shapes/reasonseg/train,data/shapes/sft.json,data/shapes/pretrain.json \
        --sample-rates 6,3,1 --val-data data/shapes/reasonseg/val --out-dir runs/seg
    torchrun --nproc_per_node 2 train_seg.py --ddp --init-from runs/sft --data ... \
        --sample-rates ...
"""

from minivlm.data.readers import read_dataset
from minivlm.errors import run_cli
from minivlm.eval.segmentation import seg_metrics
from minivlm.train.distributed import cleanup
from minivlm.train.stage import (load_training_data, parse_args, prepare_model, start,
                                 training_set)
from minivlm.train.trainable import SEG_LORA_EXTRAS
from minivlm.train.trainer import Trainer


def main(argv=None) -> dict:
    args = parse_args(__doc__, argv, train_defaults=dict(out_dir="runs/seg", lr=1e-3),
                      lora_defaults=dict(r=8, train_extra=",".join(SEG_LORA_EXTRAS)))
    env = start(args)
    model, tokenizer, run_config = prepare_model(args, env, "seg", auto_parts={"seg"},
                                                 with_seg=True)
    datasets = load_training_data(args.train_config.data, args, model, tokenizer, env,
                                  expand_texts=True)
    train_set = training_set(datasets, args, env, always_mix=True)
    c = args.train_config
    validate = None
    if c.val_data:
        val_samples = read_dataset(c.val_data, c.image_dir or None)[: args.val_limit]

        def validate(m):
            return seg_metrics(m, tokenizer, val_samples)
    results = Trainer(model, tokenizer, train_set, c, env, run_config, validate).fit()
    cleanup(env)
    return results


if __name__ == "__main__":
    run_cli(main)
