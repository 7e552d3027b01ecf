#!/usr/bin/env bash
# Install MegaVideo (editable, from this checkout) into a Python whose torch and GPU stack must stay
# as they are: the NGC PyTorch container (a pre-release torch build, Transformer Engine, apex,
# flash-attn, DALI), or any environment where they were built for the cluster.
#
#   slurm/install_keeping_torch.sh [PYTHON] [EXTRAS]     e.g. slurm/install_keeping_torch.sh python mpi
#
# - Every package of the GPU stack that is installed (torch, torchvision, torchaudio, triton,
#   numpy, transformer-engine, apex, flash-attn, nvidia-dali) is pinned to its installed version
#   in a constraints file: pip installs what is missing and fails, naming the conflict, rather
#   than replace one of them (e.g. megatron-core 0.16.1 asks for torch>=2.6.0, which the 2.6.0a0
#   build of NGC 25.01 is not).
# - The container's own constraints (PIP_CONSTRAINT, /etc/pip/constraint.txt from 25.03 on) are
#   lifted for this install, as megatron-core's install guide does: they pin every package of the
#   image, some older than megatron-core needs (packaging>=24.2); the GPU stack stays pinned here.
# Then `python -m launch.gpu_check` says what runs (docs/cluster.md).
set -euo pipefail
python=${1:-python}
extras=${2:-}
here=$(cd "$(dirname "$0")/.." && pwd)
keep=$(mktemp)
trap 'rm -f "$keep"' EXIT
stack='^(torch|torchvision|torchaudio|triton|pytorch[-_]triton|numpy|transformer[-_]engine[a-z0-9_-]*|apex|flash[-_]attn|nvidia[-_]dali[a-z0-9_-]*)=='
"$python" -m pip list --format=freeze --disable-pip-version-check | grep -iE "$stack" > "$keep" || true
echo "[megavideo] keeping $(wc -l < "$keep") installed packages as they are:"
sed 's/^/    /' "$keep"
PIP_CONSTRAINT= "$python" -m pip install --disable-pip-version-check -c "$keep" \
    -e "$here${extras:+[$extras]}"
"$python" - "$keep" <<'EOF'
import importlib.metadata as metadata
import sys

kept = dict(line.strip().split("==", 1) for line in open(sys.argv[1]) if "==" in line)
changed = {name: (version, metadata.version(name)) for name, version in kept.items()
           if metadata.version(name) != version}
if changed:
    sys.exit(f"[megavideo] these changed, which must not happen: {changed}")
print(f"[megavideo] installed; {len(kept)} packages unchanged, megatron-core "
      f"{metadata.version('megatron-core')}")
EOF
