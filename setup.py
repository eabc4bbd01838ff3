from setuptools import find_packages, setup

setup(
    name="cachedit",
    version="0.1.0",
    description="A torch.compile backend that step-caches diffusion transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cachedit", "cachedit.*"]),
    include_package_data=True,
    package_data={"cachedit": ["embedded/weights/**/*"]},
    install_requires=[
        "torch>=2.11",
        "diffusers>=0.36",
        "packaging",
        "safetensors",
        "tqdm",
        "pillow",
        "numpy",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-timeout",
            "hypothesis",
            "triton",
            # Reference implementation for decision-parity tests only; never imported by cachedit.
            "cache-dit==1.5.3",
            # LoRA (diffusers' PEFT backend) and torchao int8 weight-only tests; checked with peft 0.21.2 and
            # torchao 0.18.0 on torch 2.13 (torchao releases follow torch releases).
            "peft>=0.17,<0.22",
            "torchao>=0.16,<0.19",
            "PyYAML>=6,<7",
            # tests/integrations/test_serve.py drives a real server; checked with httpx 0.28.1.
            "httpx>=0.27,<0.29",
            "fastapi>=0.110,<1",
            "uvicorn>=0.29,<1",
            "prometheus-client>=0.20,<1",
        ],
        # `cachedit serve`: checked with fastapi 0.165, starlette 1.10, uvicorn 0.54, prometheus-client 0.26.
        "serve": ["fastapi>=0.110,<1", "uvicorn>=0.29,<1", "prometheus-client>=0.20,<1"],
        # Config files: CACHEDIT_CONFIG=path.yaml or options={"config": "path.yaml"}.
        "yaml": ["PyYAML>=6,<7"],
    },
    entry_points={
        "torch_dynamo_backends": ["cachedit = cachedit.backend:cachedit_backend"],
        "console_scripts": ["cachedit = cachedit.__main__:main"],
    },
)
