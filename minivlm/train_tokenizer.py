"""Train the SentencePiece tokenizer on the text of one or more datasets (any reader format).

    python -m minivlm.train_tokenizer --data data/shapes/pretrain.json,data/shapes/sft.json \
        --vocab-size 640 --out runs/tokenizer
"""
from __future__ import annotations

import argparse

from minivlm.data.readers import read_dataset
from minivlm.data.sentencepiece_tokenizer import train_sentencepiece
from minivlm.errors import run_cli


def dataset_texts(paths: list[str]) -> list[str]:
    """Every turn's text; <image>/[SEG] markers are removed by the trainer's symbol handling."""
    return [turn["content"] for path in paths for sample in read_dataset(path)
            for turn in sample.turns]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="comma-separated dataset files")
    parser.add_argument("--vocab-size", type=int, default=640)
    parser.add_argument("--template", default="minivlm", help="chat template: minivlm | chatml")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    texts = dataset_texts([p for p in args.data.split(",") if p])
    tokenizer = train_sentencepiece(texts, args.out, vocab_size=args.vocab_size,
                                    template=args.template)
    print(f"tokenizer: {tokenizer.vocab_size} pieces from {len(texts)} texts -> {args.out}")
    return tokenizer


if __name__ == "__main__":
    run_cli(main)
