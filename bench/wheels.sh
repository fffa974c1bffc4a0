#!/usr/bin/env bash
# The Python packages the runner needs that the GPU machine's image lacks, as wheels in .whl/ of
# the checkout the device tool sends (/work/main). The image has torch, transformers, peft,
# accelerate, safetensors, tokenizers, pyarrow, pandas, click, jinja2, rich, attrs, xxhash,
# fsspec, huggingface-hub; nothing can be downloaded there, so the rest travels.
#
#   bash bench/wheels.sh [DEST]      # DEST defaults to /work/main/.whl (git-ignored there)
#
# .whl/ is ignored by git (add `/.whl/` to .git/info/exclude), so the device call must name it:
# carry = [".whl"]; without it the folder does not travel and pip finds no wheels there.
# The whole GPU benchmark, one call (~8 minutes on an H100; BENCHMARKS.md, engine v2):
#   python3 bench/gpu.py --variants runner-allckpt,runner,runner-fullgpu,runner-v1 --out $OUT
# On the device, first thing in the command (README of the device tool, Notes):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
# --no-deps: the image's own torch/transformers must stay (a resolver would pull others).
#
# The versions are the ones the CPU venv runs (pip show there), so the two behave alike; the
# image runs Python 3.12 on x86-64, hence the platform flags. One version of each package only:
# two stop the whole install.
set -euo pipefail
DEST=${1:-/work/main/.whl}
mkdir -p "$DEST"
PACKAGES=(
    bitsandbytes==0.50.2
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19  # datasets and its own pins
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
    rpds-py==2026.9.1  # jsonschema's needs (attrs is on the image)
    tomli-w==1.2.0  # bench/gpu.py writes the benchmark recipes
)
for spec in "${PACKAGES[@]}"; do
    [ -n "$(ls "$DEST"/"$(echo "${spec%%==*}" | tr - _)"-"${spec##*==}"-*.whl 2>/dev/null)" ] && continue
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "$spec"
done

# bitsandbytes ships one kernel library per CUDA, ROCm and XPU version (1-10 MB each) and the
# device call carries at most 64 MiB in all. The image's torch is built for CUDA 13.0, so keep
# only libbitsandbytes_cuda130.so (and the CPU one) and re-zip. pip --no-deps does not check the
# wheel's RECORD against the files, but the dropped entries are removed from RECORD anyway so
# the wheel stays consistent.
BNB=$(ls "$DEST"/bitsandbytes-*.whl)
if unzip -l "$BNB" | grep -qE 'libbitsandbytes_(cuda1[0-2]|rocm|xpu)'; then
    TMP=$(mktemp -d)
    unzip -q "$BNB" -d "$TMP"
    find "$TMP/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name 'libbitsandbytes_cuda130.so' \
        ! -name 'libbitsandbytes_cpu.so' -delete
    RECORD=$(ls "$TMP"/bitsandbytes-*.dist-info/RECORD)
    grep -v -E 'libbitsandbytes_[a-z0-9]+\.so' "$RECORD" >"$RECORD.new" || true
    grep -E 'libbitsandbytes_(cuda130|cpu)\.so' "$RECORD" >>"$RECORD.new" || true
    mv "$RECORD.new" "$RECORD"
    rm "$BNB"
    (cd "$TMP" && python3 -m zipfile -c "$BNB" ./*)
    rm -rf "$TMP"
fi
du -sh "$DEST"
