"""The command line as a new user meets it: pipes closed early, warnings, argument mistakes named."""

import json
import subprocess
import sys

import pytest
import released
import torch

import fastitm
from fastitm.cli import main
from fastitm.evaluate.tasks import DataError, load_task


def _closed_pipe(args, cwd):
    """Run ``python -m fastitm ARGS`` with its stdout a pipe whose reader is gone at once (`| head` after
    its lines): (exit status, stderr)."""
    p = subprocess.Popen([sys.executable, "-m", "fastitm", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=cwd)
    p.stdout.close()
    err = p.stderr.read().decode()
    return p.wait(timeout=120), err


def test_a_reader_that_stops_early_is_not_an_error(tmp_path):
    rc, err = _closed_pipe(["info", "--json"], tmp_path)
    assert rc == 0 and "Broken pipe" not in err and "Traceback" not in err, err
    rec = {"task": "jsonl", "metrics": {"accuracy": 0.5}, "plan": {"timesteps": [1, 2]}}
    runs = tmp_path / "runs.jsonl"
    runs.write_text("\n".join(json.dumps({**rec, "recorded": f"2026-01-{n:02d}"}) for n in range(1, 28)) + "\n")
    rc, err = _closed_pipe(["results", str(runs)], tmp_path)
    assert rc == 0 and "Broken pipe" not in err and "Traceback" not in err, err


def test_warnings_are_one_line_without_source_files(tmp_path):
    f = released.copy("sugarcrepe/swap_att.json", tmp_path)
    root = f.parent
    (root / "val2017").mkdir()
    from PIL import Image

    for v in json.loads(f.read_text()).values():
        Image.new("RGB", (16, 16), (90, 10, 200)).save(root / "val2017" / v["filename"])
    done = subprocess.run([sys.executable, "-m", "fastitm", "eval", "sugarcrepe", "--data", str(root), "--model",
                           "tiny", "--timesteps", "2", "--out", str(tmp_path / "out"), "--no-progress"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    warned = [line for line in done.stderr.splitlines() if "add_att.json" in line]
    assert warned and all(line.startswith("fastitm: warning: SugarCrepe: ") for line in warned), done.stderr
    assert ".py:" not in done.stderr and "warnings.warn" not in done.stderr


def test_repeated_sugarcrepe_subset_is_scored_once(tmp_path):
    root = released.copy("sugarcrepe/swap_att.json", tmp_path).parent
    once = load_task("sugarcrepe", root, split="swap_att")
    assert len(once) > 0
    assert [i.id for i in load_task("sugarcrepe", root, split="swap_att,swap_att")] == [i.id for i in once]


def test_jsonl_item_with_both_layouts_is_refused(tmp_path):
    f = tmp_path / "set.jsonl"
    good = {"image": "a.png", "texts": ["x", "y"], "label": 0}
    f.write_text(json.dumps(good) + "\n" + json.dumps({**good, "images": ["a.png", "b.png"], "text": "x"}) + "\n")
    with pytest.raises(DataError, match=rf"{f}:2: has both layouts, image \+ texts .* and images \+ text"):
        load_task("jsonl", f)


def _exit_2(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_adaptive_is_parsed_as_meant(tmp_path, capsys):
    f = tmp_path / "none.jsonl"
    # alone before the task: racing with its defaults, and the task still the task
    assert main(["eval", "--adaptive", "jsonl", "--data", str(f), "--model", "tiny", "--out", str(tmp_path / "o")]) == 2
    assert "none.jsonl: file not found" in capsys.readouterr().err
    for bad, said in [("=", "expects KEY=VALUE"), ("alpha=", "expects KEY=VALUE"),
                      ("alpha=0.1,alpha=0.2", "names alpha twice")]:
        assert main(["eval", "jsonl", "--adaptive", bad, "--data", str(f), "--model", "tiny",
                     "--out", str(tmp_path / "o")]) == 2
        assert said in capsys.readouterr().err


def test_weights_mistakes_are_named(tmp_path, capsys):
    f = tmp_path / "none.jsonl"
    base = ["eval", "jsonl", "--data", str(f), "--model", "tiny", "--out", str(tmp_path / "o")]
    err = _exit_2([*base, "--weights", str(tmp_path)], capsys)
    assert f"{tmp_path} is a folder; give a weights file" in err
    err = _exit_2([*base, "--weights", "unifrom"], capsys)
    assert "unifrom: no such weights file; give uniform, exp, exp:RATE" in err and "'kind'" not in err
    assert main([*base, "--weights", "UNIFORM"]) == 2  # the word, in any case: on to the missing data
    assert "none.jsonl: file not found" in capsys.readouterr().err
    # a rate so large every weight is 0: the rate is named, not the weights
    from fastitm import testing

    with pytest.raises(ValueError, match=r"exp rate 1e\+06: exp\(-rate \* t / 1000\) underflows to 0 .*smaller rate"):
        fastitm.score(torch.rand(1, 3, 16, 16), ["a", "b"], model=testing.tiny_model(0), timesteps=2,
                      weights={"kind": "exp", "rate": 1e6})


def test_info_takes_tiny_json_alone_and_refuses_an_empty_model(capsys):
    assert main(["info", "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model: tiny (fastitm.testing.tiny_model") and "family: sd" in out
    assert main(["info", "--model", "tiny", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["parameters"]["unet"] == sum(p.numel() for p in fastitm.testing.tiny_model(0).unet.parameters())
    assert main(["info", "--json"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["fastitm"] == fastitm.__version__ and env["torch"] == torch.__version__
    assert env["cuda_available"] == torch.cuda.is_available() and "built" in env["native_extension"]
    assert main(["info", "--model", ""]) == 2
    assert "--model is empty" in capsys.readouterr().err


def test_calibrate_offers_only_what_it_takes(capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    import re

    def offered(text):  # the options the help lists, one per line
        return set(re.findall(r"^  (--[a-z-]+)", text, flags=re.M))

    text = offered(capsys.readouterr().out)
    assert "--fraction" in text and "--adaptive" not in text and "--weights" not in text
    for sub in ("score", "eval"):
        with pytest.raises(SystemExit):
            main([sub, "--help"])
        text = offered(capsys.readouterr().out)
        assert "--adaptive" in text and "--weights" in text


def test_model_argument_mistakes_are_named(tiny):
    with pytest.raises(TypeError, match=r"load_model takes a model folder .* got int 123"):
        fastitm.load_model(123)
    scorer = fastitm.Scorer(tiny, timesteps=2)
    with pytest.raises(TypeError, match=r"got a Scorer: its model is scorer\.model"):
        fastitm.load_model(scorer)
    with pytest.raises(TypeError, match=r"a fastitm Model, already loaded"):
        fastitm.load_model(tiny)
    # a Scorer where a model goes: its model, shared
    from fastitm.scorer import DiffusionScore

    metric = DiffusionScore(scorer, timesteps=2, seed=0)
    assert metric.scorer.model is tiny
    imgs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    metric.update(imgs, ["a red dog", "a cat"])
    want = fastitm.score(imgs, ["a red dog", "a cat"], model=tiny, timesteps=2, seed=0).matrix.diagonal().double()
    torch.testing.assert_close(metric.compute(), want.mean(), rtol=1e-5, atol=2e-5)
