"""Fine-tuning: each recipe trains a few steps, saves, reloads and scores (CI-sized); the adapter
equals its merged weights; an interrupted run resumes to the same adapter."""

import copy
import json

import pytest
import torch

import fastitm
from fastitm.cli import main
from fastitm.finetune import finetune
from fastitm.testing import assert_close

IMGS = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
TEXTS = ["a red circle", "a blue square", "green"]


def merged(base, adapter_dir):
    """The base model with W + B A (alpha = rank: scale 1) written into each adapted projection:
    computed from the saved tensors, independently of peft."""
    from safetensors.torch import load_file

    model = copy.deepcopy(base)
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    modules = dict(model.unet.named_modules())
    n = 0
    with torch.no_grad():
        for key, a in state.items():
            if ".lora_A." not in key:
                continue
            name = key.split(".lora_A.")[0]
            b = state[key.replace(".lora_A.", ".lora_B.")]
            modules[name].weight += b @ a
            n += 1
    assert n > 0
    return model


@pytest.mark.parametrize("recipe,method", [("hardneg", "diffusion_itm"), ("discffusion", "discffusion")])
def test_recipe_trains_saves_reloads_and_scores(tiny_dir, tmp_path, recipe, method):
    out = tmp_path / recipe
    finetune(recipe, "synthetic", out=out, model=str(tiny_dir), steps=3, examples=12, batch_size=3, lr=5e-2,
             progress=False)
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()
    card = json.loads((out / "training.json").read_text())
    assert card["args"]["recipe"] == recipe and len(card["history"]) == 3 and not (out / "checkpoint.pt").exists()
    base = fastitm.load_model(tiny_dir)
    tuned = fastitm.load_model(tiny_dir, lora=out)
    res = fastitm.score(IMGS, TEXTS, model=tuned, method=method, timesteps=2)
    before = fastitm.score(IMGS, TEXTS, model=base, method=method, plan=res.plan)
    assert (res.matrix - before.matrix).abs().max() > 1e-4  # the adapter changed the model
    want = fastitm.score(IMGS, TEXTS, model=merged(base, out), method=method, plan=res.plan)
    assert_close(res.matrix, want.matrix, rtol=1e-5, atol=1e-5, name=f"{recipe} adapter vs merged")
    ref = fastitm.reference.score(IMGS, TEXTS, model=tuned, method=method, plan=res.plan)
    assert_close(res.matrix, ref.matrix, rtol=1e-5, atol=2e-5, name="engine vs reference with the adapter")


def test_interrupted_training_resumes_to_the_same_adapter(tiny_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import fastitm.finetune.loop as loop

    kw = dict(model=str(tiny_dir), steps=4, examples=12, batch_size=2, lr=1e-2, progress=False)
    finetune("hardneg", "synthetic", out=tmp_path / "full", **kw)
    real, calls = loop._step, [0]

    def dying(*a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "_step", dying)
    with pytest.raises(KeyboardInterrupt):
        finetune("hardneg", "synthetic", out=tmp_path / "cut", **kw)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(loop, "_step", real)
    finetune("hardneg", "synthetic", out=tmp_path / "cut", **kw)
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_cli_and_bad_input(tiny_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["finetune", "--recipe", "discffusion", "--model", str(tiny_dir), "--out", str(out), "--steps", "1",
                 "--examples", "4", "--batch-size", "2", "--no-progress"]) == 0
    assert "load it with fastitm.load_model" in capsys.readouterr().out
    assert main(["finetune", "--recipe", "hardneg", "--model", str(tiny_dir), "--out", str(tmp_path / "x"),
                 "--data", "data.csv", "--steps", "1"]) == 2
    assert "'synthetic' or a .jsonl file" in capsys.readouterr().err
    assert main(["finetune", "--recipe", "hardneg", "--model", str(tiny_dir), "--out", str(tmp_path / "y"),
                 "--steps", "0"]) == 2
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        fastitm.load_model(tiny_dir, lora=tmp_path)


def test_training_from_jsonl(tiny_dir, tmp_path):
    from fastitm import data

    ex = data.make_dataset(4, "train", seed=1, size=16)
    for n, e in enumerate(ex):
        e.image.save(tmp_path / f"{n}.png")
    lines = [{"image": "0.png", "texts": [ex[0].caption, "a cat"], "label": 0},
             {"images": ["1.png", "2.png"], "text": ex[2].caption, "label": 1},
             {"image": "3.png", "texts": ["a dog", ex[3].caption], "label": 1}]
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines))
    from fastitm.finetune import load_examples

    exs = load_examples(str(f), 10)
    assert [e.caption for e in exs] == [ex[0].caption, ex[2].caption, ex[3].caption]
    assert exs[1].neg_images == [str(tmp_path / "1.png")] and exs[2].neg_texts == ["a dog"]
    finetune("hardneg", str(f), out=tmp_path / "ad", model=str(tiny_dir), steps=2, examples=3, batch_size=2,
             progress=False)
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()


def test_divergence_stops_without_writing_an_adapter(tiny_dir, tmp_path, monkeypatch):
    """A non-finite loss stops training with a message naming the step and lr, and no adapter is
    written (it would score NaN); a non-finite lr and fp16 training are refused before any step."""
    import fastitm.finetune.loop as loop

    kw = dict(model=str(tiny_dir), steps=4, examples=12, batch_size=2, progress=False)
    real, calls = loop._step, [0]

    def exploding(*a, **k):
        calls[0] += 1
        loss, info = real(*a, **k)
        return (loss * float("nan") if calls[0] == 2 else loss), info

    monkeypatch.setattr(loop, "_step", exploding)
    with pytest.raises(loop.Diverged, match=r"diverged at step 2: the loss is nan \(lr 0.0001\)"):
        finetune("hardneg", "synthetic", out=tmp_path / "nan", lr=1e-4, **kw)
    assert not (tmp_path / "nan" / "adapter_model.safetensors").exists()
    assert torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=False)["step"] == 1  # the last finite state
    monkeypatch.setattr(loop, "_step", real)
    for lr in (float("inf"), float("nan"), -1e-4):
        with pytest.raises(ValueError, match="lr must be a positive finite number"):
            finetune("hardneg", "synthetic", out=tmp_path / "lr", lr=lr, **kw)
    half = fastitm.load_model(tiny_dir, dtype="fp16")
    with pytest.raises(ValueError, match="fine-tuning in fp16 diverges"):
        finetune("hardneg", "synthetic", out=tmp_path / "fp16", **{**kw, "model": half})


def test_out_holding_an_adapter_is_done_or_refused(tiny_dir, tmp_path, capsys, monkeypatch):
    """Rerunning a finished command says it is done and trains nothing; another run's --out is refused,
    naming what differs, unless overwrite; the adapter file is as readable as its card; the card shows
    each loss row once; a negative --lr is refused with the reason, not argparse's."""
    import stat

    import fastitm.finetune.loop as loop

    out = tmp_path / "ad"
    kw = dict(model=str(tiny_dir), steps=2, examples=6, batch_size=2, progress=False)
    finetune("hardneg", "synthetic", out=out, **kw)
    weights = (out / "adapter_model.safetensors").read_bytes()
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(out / "adapter_model.safetensors") == mode(out / "training.json")
    card = json.loads((out / "training.json").read_text())
    table = [ln for ln in (out / "README.md").read_text().splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert [int(r.split("|")[1]) for r in table] == [h["step"] for h in card["history"]] == [1, 2]

    monkeypatch.setattr(loop, "_step", lambda *a, **k: pytest.fail("a finished run trained again"))
    capsys.readouterr()
    assert finetune("hardneg", "synthetic", out=out, **kw) == out
    assert "already holds the adapter" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match=r"other arguments \(recipe: 'hardneg' there, 'discffusion' here"):
        finetune("discffusion", "synthetic", out=out, **kw)
    with pytest.raises(FileExistsError, match=r"steps: 2 there, 3 here"):
        finetune("hardneg", "synthetic", out=out, **{**kw, "steps": 3})
    assert (out / "adapter_model.safetensors").read_bytes() == weights  # untouched
    monkeypatch.undo()
    finetune("discffusion", "synthetic", out=out, overwrite=True, **kw)
    assert json.loads((out / "training.json").read_text())["args"]["recipe"] == "discffusion"

    assert main(["finetune", "--recipe", "hardneg", "--model", str(tiny_dir), "--out", str(tmp_path / "neg"),
                 "--lr", "-1e-4"]) == 2
    assert "lr must be a positive finite number, got -0.0001" in capsys.readouterr().err


def test_loss_growing_by_orders_of_magnitude_warns(tiny_dir, tmp_path, monkeypatch):
    import fastitm.finetune.loop as loop

    real, calls = loop._step, [0]

    def growing(*a, **k):
        calls[0] += 1
        loss, info = real(*a, **k)
        # finite, but 0.5 then 1e4 from step 11 (the first 10 steps set the scale; the graph is kept)
        return loss * 0 + (1e4 if calls[0] > 10 else 0.5), info

    monkeypatch.setattr(loop, "_step", growing)
    with pytest.warns(RuntimeWarning, match=r"running loss grew from 0.5 to 500.5 by step 11 \(lr 0.0001\).*lower"):
        finetune("hardneg", "synthetic", out=tmp_path / "g", model=str(tiny_dir), steps=12, examples=6, batch_size=1,
                 lr=1e-4, progress=False)


def test_adapter_of_another_model_or_damaged_is_named(tiny_dir, tmp_path):
    import shutil

    out = tmp_path / "ad"
    finetune("hardneg", "synthetic", out=out, model=str(tiny_dir), steps=1, examples=2, batch_size=1, progress=False)
    if fastitm.models.model.embedded_model_path() is not None:  # another architecture than the tiny model's
        with pytest.raises(ValueError, match=rf"LoRA adapter {out} does not fit .*another architecture \("):
            fastitm.load_model(lora=out)
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    (cut / "adapter_model.safetensors").write_bytes((out / "adapter_model.safetensors").read_bytes()[:20])
    with pytest.raises(ValueError, match=rf"{cut / 'adapter_model.safetensors'} cannot be read .*damaged or truncated"):
        fastitm.load_model(tiny_dir, lora=cut)
    from safetensors.torch import load_file, save_file

    state = load_file(str(out / "adapter_model.safetensors"))
    save_file({k: v * float("nan") for k, v in state.items()}, str(cut / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=rf"{len(state)} of {len(state)} adapter tensors hold NaN or inf .*diverged"):
        fastitm.load_model(tiny_dir, lora=cut)  # one written elsewhere, or by an older version
