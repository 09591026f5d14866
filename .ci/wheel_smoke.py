"""Run from outside the source tree by `make wheel-check`, in a fresh environment where only the
built wheel is installed: the installed package must import every module, find its embedded model
and native extension, and score from the command line."""

import json
import subprocess
import sys
from pathlib import Path

import fastitm
from fastitm import data

root = Path(fastitm.__file__).resolve().parent
assert root.is_relative_to(Path(sys.prefix).resolve()), f"fastitm imported from {root}, not from the installed wheel"
for mod in ("fastitm.ops", "fastitm.kernels", "fastitm.engine", "fastitm.core.presets", "fastitm.cli"):
    __import__(mod)
import fastitm.kernels  # noqa: E402

# the wheel holds kernels/ inside the package (no source-checkout mapping at work)
assert [Path(p).resolve() for p in fastitm.kernels.__path__] == [root / "kernels"], fastitm.kernels.__path__
from fastitm.ops._backend import native_status  # noqa: E402

assert native_status() is None, native_status()
ex = data.make_dataset(1, "heldout", seed=0)[0]
ex.image.save("smoke.png")
texts = [ex.caption, next(iter(ex.negatives.values()))]
for preset in ([], ["--preset", "published"]):
    subprocess.run([sys.executable, "-m", "fastitm", "score", "--images", "smoke.png", "--texts", *texts,
                    "--timesteps", "2", "--no-progress", "--json", "smoke.json", *preset], check=True)
    out = json.loads(Path("smoke.json").read_text())
    assert out["backend"] == "native" and len(out["matrix"][0]) == 2, out
print(f"wheel smoke test passed: fastitm {fastitm.__version__} from {root}")
