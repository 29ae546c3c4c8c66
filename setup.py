from setuptools import find_packages, setup

setup(
    name="kunserve",
    version="0.1.0",
    description="LLM serving that survives load bursts by dropping replicated model weights",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kunserve", "kunserve.*"]),
    package_data={"kunserve": ["data/traces/*.csv", "data/traces/README.md", "data/profiles/*.json"]},
    install_requires=[
        "torch>=2.6",
        "safetensors>=0.4",
        "huggingface-hub>=0.23",
        "attrs>=23.1",
        "transformers>=4.45",
        "tokenizers>=0.19",
        "tqdm>=4.60",
        "numpy>=1.24",
        "psutil>=5.9",
    ],
    extras_require={
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27"],
        "bench": ["httpx>=0.27", "matplotlib>=3.7"],
        "gpu": ["triton>=3.0", "cuda-bindings>=12.6"],
        "dev": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "httpx>=0.27", "openai>=1.30"],
    },
)
