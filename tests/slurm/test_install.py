"""slurm/install_keeping_torch.sh: an install beside a cluster's own torch never replaces it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_torch_megatron_core_cannot_use_is_refused_not_replaced(tmp_path):
    """NGC 25.01's torch is a 2.6.0a0 build, older than megatron-core 0.16.1's torch>=2.6.0: a
    plain pip install would replace it with PyPI's; the script stops with pip's reason."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True, check=True)
    version = "2.6.0a0+ecf3bae40a"
    info = Path(purelib.stdout.strip()) / f"torch-{version}.dist-info"  # the container's build
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "install_keeping_torch.sh"), str(python)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"torch=={version}" in proc.stdout  # pinned where it is
    assert "depends on torch>=2.6" in proc.stdout + proc.stderr  # pip names the conflict
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout
    assert f"torch=={version}" in listed.splitlines()
