#!/usr/bin/env bash
# Sets up .venv (with the PyTorch baseline and test extras) and runs the whole test suite.
# Usage: bash scripts/test.sh [pytest args]
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" "torch,test"
ruff format --check dermseg_jax tests scripts
ruff check dermseg_jax tests scripts
exec python -m pytest "$@"
