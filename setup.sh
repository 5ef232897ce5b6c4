#!/usr/bin/env bash
# loralab set-up: a virtual environment in .venv with the pinned stack.
#   bash setup.sh                 # CPU machine (installs the CPU build of torch 2.13.0)
#   LORALAB_TORCH=keep bash setup.sh   # you installed a CUDA build of torch in .venv yourself first
# torch goes in first: deepspeed builds from source and imports torch while it builds.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "loralab needs Python 3.11 or newer (found " + sys.version.split()[0] + "); set PYTHON=python3.11")'
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [ "${LORALAB_TORCH:-}" != "keep" ]; then
  python -m pip install -q "$(grep '^torch==' requirements.txt)"
fi
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps -e .
python -c "import loralab, torch, transformers, peft, bitsandbytes, papermill, jupyterlab, jupytext; print('loralab ready: torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| JupyterLab', jupyterlab.__version__, '| CUDA', torch.cuda.is_available())"
echo "activate with: . .venv/bin/activate     notebooks in JupyterLab: python lab.py"
