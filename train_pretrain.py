"""Stage 1 — caption alignment (LLaVA stage 1, MiniMind-V pretrain).

Teaches the projector to turn CLIP patch tokens into embeddings the language model can read, by
training on image captions. Trains the projector, plus any part that starts from random weights
(on the synthetic world: everything). Usage:

    python train_pretrain.py --data data/shapes/pretrain.json --tokenizer runs/tokenizer \
        --out-dir runs/pretrain
    torchrun --nproc_per_node 2 train_pretrain.py --ddp --data data/shapes/pretrain.json \
        --tokenizer runs/tokenizer --out-dir runs/pretrain
"""

from minivlm.errors import run_cli
from minivlm.train.distributed import cleanup
from minivlm.train.stage import load_training_data, parse_args, prepare_model, start
from minivlm.train.trainer import Trainer


def main(argv=None) -> dict:
    args = parse_args(__doc__, argv, train_defaults=dict(out_dir="runs/pretrain", lr=2e-3,
                                                         max_steps=200))
    env = start(args)
    model, tokenizer, run_config = prepare_model(args, env, "pretrain", auto_parts={"projector"})
    (train_set,) = load_training_data(args.train_config.data, args, model, tokenizer, env)
    results = Trainer(model, tokenizer, train_set, args.train_config, env, run_config).fit()
    cleanup(env)
    return results


if __name__ == "__main__":
    run_cli(main)
