#!/usr/bin/env bash
# The main job on a fresh machine: set up the environment (.ci/setup), then fine-tune
# SmolLM2-135M-Instruct with LoRA on the bundled date-rewriting task. Extra arguments go to train.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash .ci/setup
exec .venv/bin/python examples/smollm2_lora/train.py "$@"
