"""Print the resolved version of each dependency that has broken, or may break, a fresh install: one
line each, at CI's start, so a change of the world shows in the log of the run it broke."""

from importlib.metadata import PackageNotFoundError, version

for name in ("torch", "diffusers", "transformers", "peft", "huggingface_hub", "kernels", "triton", "torchmetrics"):
    try:
        print(f"ci: {name} {version(name)}")
    except PackageNotFoundError:
        print(f"ci: {name} not installed")
