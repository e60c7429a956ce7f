#!/usr/bin/env bash
# Device kit: the wheels a GPU machine needs for this project that its image lacks, under a size limit.
#
#   bash benchmarks/device_kit.sh [build] [KIT_DIR]            here (needs PyPI): default build/device_kit
#   bash benchmarks/device_kit.sh install [KIT_DIR] [TARGET]   on the device (no network): default /tmp/spice-kit
#       then: export PYTHONPATH=TARGET${PYTHONPATH:+:$PYTHONPATH} PATH=TARGET/bin:$PATH
#
# env (build): PYTHON=.venv/bin/python (its pip resolves and builds; its ray and deepspeed versions are
#   the kit's)  PY_VERSION=3.12 (the device image's python3 is 3.12.3)  LIMIT_MIB=60
#   RAY_DROP="ray/jars" (paths repacked out of ray's wheel)  IMAGE_PACKAGES="..." (what the image holds;
#   "" = only torch & co. and their closure)  KIT_SKIP="virtualenv py-spy" (left out, see below)
#
# What goes in: the closure of the project's dependencies (pyproject.toml: ray[data,train,default] at
# the installed version, deepspeed's own requirements, pydantic, typer, rich, ...) resolved by pip for
# CPython $PY_VERSION on manylinux x86_64 (at the versions installed here where they resolve), walked
# from the requirements without entering a package the image has (torch, transformers, peft, pyarrow,
# numpy, safetensors, tokenizers and the rest of the device notes' list for its image,
# IMAGE_PACKAGES; with IMAGE_PACKAGES="" the closure of torch & co. read from the installed metadata)
# nor one of KIT_SKIP. ray, deepspeed, pydantic, pydantic-core, typer and rich always come (at
# versions that satisfy the project; they shadow the image's).
# ray's wheel is repacked without ray/jars (Java, unused here); deepspeed (an sdist) is built as a
# pure-Python wheel with DS_BUILD_OPS=0 (nothing compiled; ops JIT-build on the device if used);
# the project itself is `pip wheel --no-deps .`. Each wheel's size and the total are printed; the
# build fails if the total is over LIMIT_MIB.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=build
case "${1:-}" in build|install) MODE=$1; shift ;; esac

if [ "$MODE" = install ]; then
  KIT=${1:-build/device_kit}
  TARGET=${2:-/tmp/spice-kit}
  ls "$KIT"/*.whl >/dev/null
  # --no-deps: the kit is already the closure; pip would otherwise try to resolve torch & co. offline.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --find-links "$KIT" --target "$TARGET" "$KIT"/*.whl
  echo "installed $(ls "$KIT"/*.whl | wc -l) wheels into $TARGET; now:" >&2
  echo "export PYTHONPATH=$TARGET\${PYTHONPATH:+:\$PYTHONPATH} PATH=$TARGET/bin:\$PATH"
  exit 0
fi

KIT=${1:-build/device_kit}
PYTHON=${PYTHON:-.venv/bin/python}
PY_VERSION=${PY_VERSION:-3.12}
LIMIT_MIB=${LIMIT_MIB:-60}
RAY_DROP=${RAY_DROP:-ray/jars}
# The device image's packages, as documented for the GPU machine (read 2026-11-17).
IMAGE_PACKAGES=${IMAGE_PACKAGES:-"absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"}
ALWAYS="ray deepspeed pydantic pydantic-core typer rich spice-ray"
# Left out on purpose: ray[default]'s virtualenv (5.5 MiB; runtime_env pip/virtualenv/uv, which needs
# a network the device lacks) and py-spy (2.8 MiB; `ray stack` and dashboard profiling).
KIT_SKIP=${KIT_SKIP:-"virtualenv py-spy"}
CORE="torch transformers peft pyarrow numpy safetensors tokenizers"
PLATFORM_ARGS=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp --abi "cp${PY_VERSION/./}"
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
  --platform manylinux_2_5_x86_64 --platform linux_x86_64)

version_of() { "$PYTHON" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
RAY_VERSION=$(version_of ray)
DS_VERSION=$(version_of deepspeed)
[ -n "$RAY_VERSION" ] && [ -n "$DS_VERSION" ] || { echo "ray and deepspeed must be installed in $PYTHON's environment" >&2; exit 1; }
echo "device kit: CPython $PY_VERSION manylinux x86_64, ray $RAY_VERSION (without $RAY_DROP), deepspeed $DS_VERSION -> $KIT" >&2

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
rm -rf "$KIT"
mkdir -p "$KIT"

# 1. The project and deepspeed as wheels (deepspeed's setup.py imports torch: no build isolation,
#    this venv's torch; DS_BUILD_OPS=0 so that no op is compiled).
"$PYTHON" -m pip wheel -q --no-deps -w "$KIT" . >&2
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$KIT" "deepspeed==$DS_VERSION" >&2

# 2. The closure, resolved for the device's platform at the versions installed here where they exist.
"$PYTHON" -m pip freeze --exclude-editable 2>/dev/null | grep -E '^[A-Za-z0-9_.-]+==' \
  | grep -v -i -E '^(torch|deepspeed|spice-ray)==' >"$WORK/constraints.txt" || true
"$PYTHON" - "$KIT" "$RAY_VERSION" >"$WORK/requirements.txt" <<'EOF'
import glob, sys, zipfile
from email.parser import Parser
from packaging.requirements import Requirement

kit, ray_version = sys.argv[1], sys.argv[2]
core = {"torch", "transformers", "peft", "pyarrow", "numpy", "safetensors", "tokenizers", "deepspeed", "ray"}
reqs = [f"ray[data,train,default]=={ray_version}"]
for pattern in ("spice_ray-*.whl", "deepspeed-*.whl"):
    with zipfile.ZipFile(glob.glob(f"{kit}/{pattern}")[0]) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []:
            req = Requirement(line)
            if req.marker is None and req.name.lower() not in core:
                reqs.append(line)
print("\n".join(dict.fromkeys(reqs)))
EOF
resolve() {  # $1: constraints file or empty
  "$PYTHON" -m pip install -q --dry-run --ignore-installed --target "$WORK/none" --report "$WORK/report.json" \
    "${PLATFORM_ARGS[@]}" ${1:+-c "$1"} -r "$WORK/requirements.txt" 2>"$WORK/resolve.log"
}
if ! resolve "$WORK/constraints.txt"; then
  echo "(the installed versions do not all resolve for CPython $PY_VERSION: resolving without them)" >&2
  resolve "" || { cat "$WORK/resolve.log" >&2; exit 1; }
fi

# 3. Keep what the image lacks: walk the resolved graph from the requirements, not entering a
#    package the image holds (IMAGE_PACKAGES, else the closure of CORE read from the installed
#    metadata) nor one of KIT_SKIP; ALWAYS always comes.
"$PYTHON" - "$WORK/report.json" "$WORK/requirements.txt" "$PY_VERSION" "$CORE" "$IMAGE_PACKAGES" "$ALWAYS" "$KIT_SKIP" \
  >"$WORK/pins.txt" <<'EOF'
import json, sys
from importlib.metadata import PackageNotFoundError, distribution
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon

report, requirements, py = sys.argv[1:4]
core, image, always, kit_skip = ({canon(n) for n in a.split()} for a in sys.argv[4:8])
env = {"python_version": py, "python_full_version": py + ".0", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "os_name": "posix"}


def wanted(req, extras):
    return req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in extras | {""})


def core_closure():
    seen, todo = set(), list(core)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = [Requirement(r) for r in distribution(name).requires or []]
        except PackageNotFoundError:
            continue
        todo += [canon(r.name) for r in reqs if wanted(r, set())]
    return seen


items = {canon(i["metadata"]["name"]): i for i in json.load(open(report))["install"]}
skip = (image or core_closure()) | core | kit_skip
keep, todo = [], [(canon(r.name), set(r.extras)) for r in map(Requirement, open(requirements).read().splitlines()) if r]
while todo:
    name, extras = todo.pop()
    if name in keep or name not in items or (name in skip and name not in always):
        continue
    keep.append(name)
    extras |= set(items[name].get("requested_extras") or [])
    reqs = [Requirement(r) for r in items[name]["metadata"].get("requires_dist") or []]
    todo += [(canon(r.name), set(r.extras)) for r in reqs if wanted(r, extras)]
for name in sorted(items):
    version = items[name]["metadata"]["version"]
    if name in keep:
        print(f"{name}=={version}")
    else:
        why = "KIT_SKIP" if name in kit_skip else "the image has it" if name in skip else "only for a package left out"
        print(f"  not in the kit: {name}=={version} ({why})", file=sys.stderr)
EOF
grep -v -E '^(deepspeed|spice-ray)==' "$WORK/pins.txt" >"$WORK/download.txt"

# 4. Download them (binary wheels for the device), repack ray.
"$PYTHON" -m pip download -q --no-deps "${PLATFORM_ARGS[@]}" -d "$KIT" -r "$WORK/download.txt" >&2
drop=()
for p in $RAY_DROP; do drop+=(--drop "$p"); done
"$PYTHON" benchmarks/repack_wheel.py "$KIT"/ray-"$RAY_VERSION"-*.whl "${drop[@]}" >/dev/null

# 5. Sizes, total, limit.
"$PYTHON" - "$KIT" "$LIMIT_MIB" <<'EOF'
import glob, os, sys
kit, limit = sys.argv[1], float(sys.argv[2])
wheels = sorted(glob.glob(f"{kit}/*.whl"), key=os.path.getsize, reverse=True)
total = 0
for w in wheels:
    size = os.path.getsize(w)
    total += size
    print(f"{size / 2**20:9.2f} MiB  {os.path.basename(w)}")
print(f"{total / 2**20:9.2f} MiB  total, {len(wheels)} wheels (limit {limit:g} MiB)")
if total > limit * 2**20:
    sys.exit(f"device kit is {total / 2**20:.2f} MiB: over the {limit:g} MiB limit")
EOF
