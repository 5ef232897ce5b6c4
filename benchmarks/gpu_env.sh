# Source this on the offline GPU machine, from the repo root:  . benchmarks/gpu_env.sh
# Installs the carried wheels (.whl/, built here with `bash tools/gpu_wheelhouse.sh .whl`: ~30 MiB of
# Python 3.12 x86-64 wheels of what the image lacks) into /tmp/site beside the image's
# torch/transformers/peft, and points loralab at the carried data (.gpu/data/).
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | grep -v "already exists\|WARNING: Target directory" || true
export PYTHONPATH=/tmp/site:$PWD/lib${PYTHONPATH:+:$PYTHONPATH}
export PATH=/tmp/site/bin:$PATH
export JUPYTER_PATH=/tmp/site/share/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}  # nbconvert templates, kernelspecs
export LORALAB_SAMSUM_DIR=$PWD/.gpu/data/samsum
export LORALAB_LLAMA2_TOKENIZER=$PWD/.gpu/data/llama2-tokenizer/tokenizer.model
export LORALAB_HOME=${LORALAB_HOME:-/tmp/loralab_home}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 - <<'PY'
import torch
from loralab.device import versions
print("gpu:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none", "| " + " ".join(
    f"{p} {v}" for p, v in versions(("torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel",
                                     "datasets", "pyarrow", "papermill", "nvitop")).items()))
PY
set +e
