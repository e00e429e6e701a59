"""Stage 2 — visual instruction tuning: single- and multi-image conversations.

Full fine-tuning of the projector and the language model by default; `--lora-r 8` trains LoRA
adapters instead (plus the projector). With `--val-data` (Chiron-format eval JSON) it measures
closed-question accuracy every `--eval-every` steps. Several --data files are drawn in the
--sample-rates proportions; with `--seg-enabled` the model gets its segmentation head here and
learns masks from ReasonSeg data jointly with the questions, from this stage on. Usage:

    python train_sft.py --init-from runs/pretrain --data data/shapes/sft.json \
        --val-data data/shapes/val.json --out-dir runs/sft
    torchrun --nproc_per_node 2 train_sft.py --ddp --init-from runs/pretrain \
        --data data/shapes/sft.json --out-dir runs/sft [--zero1]
    python train_sft.py --init-from runs/pretrain --seg-enabled --sample-rates 2,2,1 \
        --data data/shapes/reasonseg/train,data/shapes/sft.json,data/shapes/pretrain.json
"""

from minivlm.data.readers import read_dataset
from minivlm.errors import run_cli
from minivlm.eval.vqa import vqa_metrics
from minivlm.train.distributed import cleanup
from minivlm.train.stage import (load_training_data, parse_args, prepare_model, start,
                                 training_set)
from minivlm.train.trainer import Trainer


def main(argv=None) -> dict:
    args = parse_args(__doc__, argv, train_defaults=dict(out_dir="runs/sft", lr=1e-3))
    env = start(args)
    # With --seg-enabled the head is new and random: set_trainable trains it with the rest.
    model, tokenizer, run_config = prepare_model(args, env, "sft",
                                                 auto_parts={"projector", "lm", "seg"})
    datasets = load_training_data(args.train_config.data, args, model, tokenizer, env,
                                  expand_texts=True)
    train_set = training_set(datasets, args, env)
    validate = None
    if args.train_config.val_data:
        c = args.train_config
        val_samples = read_dataset(c.val_data, c.image_dir or None)[: args.val_limit]

        def validate(m):  # closed accuracy per question type (and the shapes world's probe)
            return vqa_metrics(m, tokenizer, val_samples,
                               max_new_tokens=args.val_max_new_tokens)
    results = Trainer(model, tokenizer, train_set, args.train_config, env, run_config,
                      validate).fit()
    cleanup(env)
    return results


if __name__ == "__main__":
    run_cli(main)
