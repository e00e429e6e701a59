"""python -m minivlm.data.shapes --out data/shapes --seed 0 (options: generate.py)."""

from minivlm.data.shapes.generate import main
from minivlm.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
