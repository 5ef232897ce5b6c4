#!/usr/bin/env bash
# loralab's wheelhouse for the offline GPU machine: Python 3.12 / x86-64 wheels of what its image lacks.
#
#   . .venv/bin/activate && bash tools/gpu_wheelhouse.sh [DEST]     (default DEST=.whl, git-ignored)
#   EXTRA="pyarrow==26.0.1" bash tools/gpu_wheelhouse.sh             # more packages (name or name==version)
#
# The GPU image already holds torch, transformers, peft, accelerate, numpy, pandas, pyarrow, safetensors,
# sentencepiece, tokenizers, huggingface-hub, triton, tqdm, click, rich and the rest of IMAGE below. This
# carries the notebook and report stack (papermill, jupytext, nbformat, nbclient, nbconvert, ipykernel and
# what they need, entrypoints included), datasets (dill, multiprocess), liger-kernel, deepspeed and
# rouge-score (sdists, built here as pure-Python wheels), nltk, nvitop, plotly and bitsandbytes (repacked
# by tools/slim_wheel.py with its CPU and CUDA 13 libraries only: ~7 MB, not ~40).
# Versions: the ones installed in this environment (setup.sh installs requirements.txt's pins: what CI
# tests), else PINS below, else the newest. Run it in the project's venv: deepspeed's sdist imports torch
# while it builds. Two checks end it: every wheel installs on CPython 3.12 / manylinux x86-64, and every
# requirement of every wheel is in the wheelhouse, IMAGE or OPTIONAL (else it says which and exits 1).
#
# On the GPU machine, from the repo root: `. benchmarks/gpu_env.sh` installs DEST/*.whl into /tmp/site
# (pip --no-index --no-deps --target) and puts it first on PYTHONPATH. DEST must stay well under the
# device's 64 MiB carry limit (this prints its size).
set -euo pipefail
dest=${1:-.whl}
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
mkdir -p "$dest"

pkgs=(
  # notebooks and reports
  papermill entrypoints tenacity click jupytext mdit-py-plugins nbformat fastjsonschema jsonschema
  jsonschema-specifications referencing rpds-py nbclient jupyter_client jupyter_core platformdirs traitlets
  nbconvert mistune bleach tinycss2 webencodings pandocfilters beautifulsoup4 soupsieve defusedxml
  jupyterlab_pygments ipykernel comm ipython ipython_pygments_lexers matplotlib-inline nest-asyncio2 pyzmq
  tornado prompt_toolkit wcwidth pexpect ptyprocess decorator stack_data asttokens executing pure_eval plotly
  # data, kernels, quantization, profiling, metrics
  datasets dill multiprocess liger-kernel bitsandbytes hjson pydantic pydantic-core annotated-types
  typing-inspection nvitop nltk
  ${EXTRA:-})
sdists=(deepspeed rouge-score)   # no wheels on PyPI: built here (pure Python)
PINS="liger-kernel==0.8.5"      # CUDA only, so not in requirements.txt: the version the GPU results used
IMAGE="absl-py accelerate aiohttp annotated-doc anyio attrs certifi charset-normalizer click cuda-bindings
  cuda-pathfinder einops filelock fsspec h11 hf-xet httpcore httpx huggingface-hub idna jinja2 joblib
  markdown-it-py markupsafe mdurl msgpack narwhals networkx ninja numpy nvidia-ml-py packaging pandas peft
  pillow psutil py-cpuinfo pyarrow pygments python-dateutil pyyaml regex requests rich safetensors
  sentencepiece setuptools six sympy tokenizers torch tqdm transformers triton typing-extensions urllib3
  xxhash yarl"   # the image's packages that the wheels here require
OPTIONAL="debugpy jedi parso"   # required by metadata, imported only if present: ipykernel's debugger (debugpy),
                                # IPython's completion (jedi, parso); left out, ~10 MB

spec() {  # name -> name==version: this environment's version, else PINS, else the name alone
  "$py" - "$1" "$PINS" <<'PY'
import importlib.metadata as md, re, sys
name, pins = sys.argv[1], dict(p.split("==") for p in sys.argv[2].split())
if "==" in name:
    print(name); sys.exit()
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
try:
    print(f"{name}=={md.version(name)}")
except md.PackageNotFoundError:
    print(next((f"{name}=={v}" for k, v in pins.items() if norm(k) == norm(name)), name))
PY
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
wanted=(); for p in "${pkgs[@]}"; do wanted+=("$(spec "$p")"); done
built=(); for p in "${sdists[@]}"; do built+=("$(spec "$p")"); done
echo "downloading ${#wanted[@]} wheels, building ${#built[@]} (${built[*]})"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$tmp" "${wanted[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
"$py" -m pip wheel -q --no-deps --no-build-isolation -w "$tmp" "${built[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
for w in "$tmp"/bitsandbytes-*.whl; do
  "$py" "$here/slim_wheel.py" "$w" "$dest" 'libbitsandbytes_(cpu|cuda13)' && rm "$w"
done
mv "$tmp"/*.whl "$dest"/

"$py" - "$dest" "$IMAGE $OPTIONAL" <<'PY'
"""Every wheel installs on CPython 3.12 / manylinux x86-64; every requirement is carried, in the image or optional."""
import re, sys, zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

dest, image = Path(sys.argv[1]), {canonicalize_name(n) for n in sys.argv[2].split()}
plats = [f"manylinux_2_{m}_x86_64" for m in range(28, 4, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"]
ok_tags = set(cpython_tags((3, 12), abis=["cp312", "abi3", "none"], platforms=plats)) | set(compatible_tags((3, 12), "cp312", plats))
env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython", "os_name": "posix"}
wheels = sorted(dest.glob("*.whl"))
have = {canonicalize_name(parse_wheel_filename(w.name)[0]) for w in wheels}
bad_tags, missing = [], {}
for w in wheels:
    name, _, _, tags = parse_wheel_filename(w.name)
    if not tags & ok_tags:
        bad_tags.append(w.name)
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        msg = Parser().parsestr(z.read(meta).decode())
    for line in msg.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue
        dep = canonicalize_name(req.name)
        if dep not in have and dep not in image:
            missing.setdefault(dep, []).append(str(name))
print(f"{len(wheels)} wheels in {dest}; all for CPython 3.12 / manylinux x86-64: {not bad_tags}"
      + (f" (not: {', '.join(bad_tags)})" if bad_tags else ""))
if missing:
    print("required but neither carried nor in the image: "
          + "; ".join(f"{d} (by {', '.join(sorted(set(by)))})" for d, by in sorted(missing.items())))
sys.exit(1 if bad_tags or missing else 0)
PY
du -sh "$dest"
