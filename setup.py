from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_requirements(name):
    lines = (HERE / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="megatron_unihetero",
    version="0.1.0",
    description="Pretraining unified vision-language models (UniHetero) on megatron-core and DeepSpeed",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_unihetero", "megatron_unihetero.*"]),
    install_requires=read_requirements("requirements.txt"),
    extras_require={
        "dev": read_requirements("requirements-dev.txt"),
        # GPU accelerators: used when importable, never required.
        "gpu": ["flash-attn", "transformer-engine[pytorch]"],
    },
)
