"""recbole_llmser: LLM-based data augmentation for sequential recommendation on RecBole 1.2.1.

Install with the Makefile (``make install``): it installs torch first (pinned, so no CUDA build is pulled on a
CPU machine), then requirements.txt, then RecBole and this package with ``--no-deps`` so that RecBole's
``ray<=2.6.3`` requirement is never installed (setup.py cannot drop a dependency's dependency).
"""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def requirements(name):
    lines = (HERE / name).read_text(encoding="utf-8").splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


setup(
    name="recbole_llmser",
    version="0.1.0",
    description="LLM-based data augmentation (LLMSeR) and LLM-enhanced item embeddings (TSLRec) for RecBole",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["recbole_llmser", "recbole_llmser.data", "recbole_llmser.augment", "recbole_llmser.tslrec",
              "recbole_llmser.experiments", "recbole_llmser.properties"],
    package_dir={"recbole_llmser.properties": "properties"},
    package_data={"recbole_llmser.properties": ["*.yaml", "model/*.yaml", "dataset/*.yaml", "presets/*.yaml"]},
    py_modules=["run_recbole_llmser"],
    install_requires=["recbole==1.2.1", "torch>=1.10"] + requirements("requirements.txt"),
    extras_require={"dev": requirements("requirements-dev.txt"), "tslrec": requirements("requirements-tslrec.txt")},
    entry_points={"console_scripts": ["recbole-llmser=recbole_llmser.cli:main"]},
    license="MIT",
)
