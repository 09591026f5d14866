import json

import pytest
import torch
from PIL import Image

import fastitm
from fastitm.cli import main


@pytest.fixture
def image_files(tmp_path):
    paths = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        arr = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
        p = tmp_path / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def test_score_prints_table_and_writes_json(tiny_dir, image_files, tmp_path, capsys):
    out = tmp_path / "out.json"
    rc = main(["score", "--model", str(tiny_dir), "--images", *map(str, image_files), "--texts", "a dog", "a cat",
               "--timesteps", "2", "--seed", "3", "--json", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "a dog" in printed and "img1.png" in printed
    data = json.loads(out.read_text())
    ref = fastitm.reference.score(image_files, ["a dog", "a cat"], model=fastitm.load_model(tiny_dir),
                                  timesteps=2, seed=3)
    # normalized scores are differences of L2 errors ~20: absolute tolerance relative to those
    torch.testing.assert_close(torch.tensor(data["matrix"]), ref.matrix, rtol=1e-5, atol=2e-5)
    assert data["plan"]["timesteps"] == ref.plan.timesteps.tolist() and data["plan"]["seed"] == 3
    assert data["method"] == "diffusion_itm" and data["versions"]["fastitm"] == fastitm.__version__
    assert f"{data['matrix'][0][0]:.5g}" in printed


def test_method_options(tiny_dir, image_files, tmp_path):
    out = tmp_path / "o.json"
    rc = main(["score", "--model", str(tiny_dir), "--images", str(image_files[0]), "--texts", "a dog",
               "--method", "discffusion", "--option", "pool=probs", "--option", "lam=2", "--timesteps", "1",
               "--json", str(out), "--no-progress"])
    assert rc == 0
    assert json.loads(out.read_text())["options"]["pool"] == "probs"


@pytest.mark.parametrize("args,message", [
    (["--images", "missing.png", "--texts", "a"], "image file not found"),
    (["--texts", "a", "--timesteps", "0"], "at least 1"),
    (["--texts", "a", "--option", "bogus=1"], "unknown option"),
])
def test_bad_input_exits_nonzero(tiny_dir, image_files, capsys, args, message):
    if "--images" not in args:
        args = ["--images", str(image_files[0]), *args]
    rc = main(["score", "--model", str(tiny_dir), *args, "--no-progress"])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_missing_model_folder(tmp_path, image_files, capsys):
    rc = main(["score", "--model", str(tmp_path / "none"), "--images", str(image_files[0]), "--texts", "a"])
    assert rc == 2 and "model folder not found" in capsys.readouterr().err


def test_demo_runs(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--timesteps", "2", "--n", "8"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM-WEIGHT" not in out  # the embedded model, not the fallback
    table = out.split("chance is 0.50")[1]
    for method in fastitm.METHODS:
        row = next(line for line in table.splitlines() if line.startswith(method))
        accs = [float(x) for x in row.split()[1::2]]  # "0.88 (8)" cells
        assert len(accs) == 5 and all(0.0 <= a <= 1.0 for a in accs)
    assert "image retrieval" in out
    from PIL import Image

    with Image.open(tmp_path / "demo_grid.png") as im:
        assert im.size[0] >= 6 * 128


def test_demo_bad_n(capsys):
    assert main(["demo", "--n", "3"]) == 2
    assert "--n must be at least 8" in capsys.readouterr().err


def test_elimination_checkpoint_and_batch_size(tiny_dir, image_files, tmp_path):
    out, ckpt = tmp_path / "out.json", tmp_path / "run.pt"
    texts = ["a dog", "a cat", "a red circle", "two birds"]
    args = ["score", "--model", str(tiny_dir), "--images", *map(str, image_files), "--texts", *texts,
            "--method", "diffusion_classifier", "--option", "elimination=1:2", "--timesteps", "3",
            "--batch-size", "3", "--checkpoint", str(ckpt), "--json", str(out), "--no-progress"]
    assert main(args) == 0 and ckpt.exists()
    data = json.loads(out.read_text())
    ref = fastitm.reference.score(image_files, texts, model=fastitm.load_model(tiny_dir),
                                  method="diffusion_classifier", timesteps=3, seed=0, elimination=[(1, 2)])
    for row, ref_row in zip(data["matrix"], ref.matrix.tolist(), strict=True):
        assert [v is None for v in row] == [v == float("-inf") for v in ref_row]  # eliminated -> null
        assert all(abs(v - r) <= 1e-5 * abs(r) for v, r in zip(row, ref_row, strict=True) if v is not None)
    assert data["stats"]["unet_rows"] == 2 * (4 * 1 + 2 * 2) and data["stats"]["batch_size"] == 3
    # Rerunning with the finished checkpoint computes nothing.
    assert main(args) == 0
    assert json.loads(out.read_text())["stats"]["unet_rows"] == 0


def test_checkpoint_of_another_run_exits_2(tiny_dir, image_files, tmp_path, capsys):
    ckpt = tmp_path / "run.pt"
    base = ["score", "--model", str(tiny_dir), "--images", *map(str, image_files), "--timesteps", "1",
            "--checkpoint", str(ckpt), "--no-progress", "--texts"]
    assert main(base + ["a dog"]) == 0
    assert main(base + ["a cat"]) == 2
    assert "another run" in capsys.readouterr().err
