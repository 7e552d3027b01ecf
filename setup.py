"""MegaVideo: InternVideo2-class video foundation models on megatron-core."""

from setuptools import find_packages, setup

TORCHAO = "torchao>=0.18"
DALI = "nvidia-dali-cuda120>=2.0"  # dataloaders/dali.py: MIN_VERSION

setup(
    name="megavideo",
    version="0.1.0",
    description="Train InternVideo2-class video foundation models with megatron-core "
    "(tensor, sequence, pipeline and data parallelism) on SLURM GPU clusters.",
    python_requires=">=3.10",
    packages=find_packages(include=["megavideo*", "parallel*", "kernels*", "dataloaders*",
                                    "launch*"]),
    install_requires=[
        # a lower bound only (megatron-core 0.16.1's): clusters bring their own build, e.g. the
        # NGC PyTorch container (slurm/install_keeping_torch.sh installs beside it)
        "torch>=2.6",
        "megatron-core==0.16.1",
        "psutil",  # megatron-core's checkpoint writer needs it but does not declare it
        "einops",
        "pyyaml",
        "omegaconf>=2.3",  # the config: YAML and overrides merged onto the dataclass schema
        "tensorboard",
        "av>=12",  # PyAV: manifests and the CPU decode path
        "safetensors",  # stage 3: Hugging Face LLM weights in and out
        "tokenizers",  # stage 3: the LLM's tokenizer.json
        "matplotlib",  # launch.profile's plots
    ],
    extras_require={
        # the GPU stack, optional at run time (NVIDIA's apex is used when present, never required:
        # the PyPI package named "apex" is unrelated). Transformer Engine: the releases
        # megatron-core 0.16.1 was released against (its own dev extra); flash-attn: the range
        # those TE releases accept; DALI: fn.decoders.video with frames= and pad_mode=
        "gpu": ["transformer-engine[pytorch]>=2.9.0a0,<2.12.0", "flash-attn>=2.1.1,<=2.8.1",
                DALI],
        # DALI alone: its CPU pipeline decodes VP8/VP9/MJPEG without a GPU (CI tests it)
        "dali": [DALI],
        "mpi": ["mpi4py"],
        # the decoder the official InternVideo2 code uses, for launch.bench_data's baseline
        "bench": ["decord"],
        # FP8 GEMMs on the local spec (train.precision=fp8 without Transformer Engine); its float8
        # training also runs on the CPU (torch._scaled_mm), where CI tests it
        "fp8": [TORCHAO],
        # transformers: the reference BERT the stage-2 weight import is tested against (tiny
        # random configs built locally, nothing downloaded)
        "dev": ["pytest", "ruff", DALI, "mpi4py", TORCHAO, "transformers>=4.40"],
    },
)
