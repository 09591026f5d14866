"""A second `fastitm eval` on the same --out or --checkpoint: the same evaluation is replaced or resumed,
another is refused naming what differs, and a checkpoint in use is refused naming its holder."""

import json
import os

import pytest
import torch

from fastitm.cli import main
from fastitm.engine import CheckpointError
from fastitm.evaluate import runner
from fastitm.testing import write_jsonl_set


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    return write_jsonl_set(tmp_path_factory.mktemp("set"), 4, seed=11, negatives=2)


def _eval(jsonl, out, *extra):
    return main(["eval", "jsonl", "--data", str(jsonl), "--model", "tiny", "--timesteps", "2", "--out", str(out),
                 "--no-progress", *extra])


@pytest.mark.parametrize("extra, named", [
    (["--method", "diffusion_classifier"], 'method "diffusion_itm" there, "diffusion_classifier" here'),
    (["--timesteps", "3"], "timesteps 2 there, 3 here"),
    (["--weights", "exp:7"], 'weights "uniform" there, {"kind": "exp", "rate": 7.0} here'),
    (["--limit", "1"], "limit null there, 1 here"),
    (["--option", "err=mse"], 'options {} there, {"err": "mse"} here'),
])
def test_out_of_another_evaluation_is_refused_naming_what_differs(jsonl, tmp_path, capsys, extra, named):
    out = tmp_path / "out"
    assert _eval(jsonl, out) == 0
    before = (out / "report.json").read_text()
    assert len(json.loads(before)["items"]) == 4
    capsys.readouterr()
    assert _eval(jsonl, out, *extra) == 2
    err = capsys.readouterr().err
    assert "holds the report of another evaluation" in err and named in err, err
    assert (out / "report.json").read_text() == before  # nothing replaced
    # the same evaluation again (an explicit default) is a rerun: replaced without --overwrite
    assert _eval(jsonl, out, "--method", "diffusion_itm", "--seed", "0") == 0
    # --overwrite replaces it with the other one
    assert _eval(jsonl, out, *extra, "--overwrite") == 0
    assert json.loads((out / "report.json").read_text())["evaluation"]["timesteps"] == (3 if "3" in extra else 2)


def test_eval_checkpoint_is_locked_while_a_run_holds_it(jsonl, tmp_path, capsys):
    from fastitm.engine import checkpoint_lock

    ckpt = tmp_path / "eval.pt"
    with checkpoint_lock(ckpt):  # as another process running with it would
        assert _eval(jsonl, tmp_path / "out", "--checkpoint", str(ckpt)) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt} is in use by another run (process {os.getpid()})" in err
    assert not ckpt.exists()
    assert _eval(jsonl, tmp_path / "out", "--checkpoint", str(ckpt)) == 0  # released: runs
    assert ckpt.exists() and not ckpt.with_name("eval.pt.lock").exists()


def test_a_checkpoint_of_other_racing_options_is_refused(jsonl, tmp_path, tiny):
    """Racing's options enter the run's identity as they act, resolved: a run made when ``settled`` stayed
    at 0.05 whatever ``alpha`` was is refused by the same alpha now (settled follows it), and resumed
    by the options spelled out."""
    ckpt = tmp_path / "eval.pt"
    race = {"alpha": 0.01, "min_timesteps": 2, "round_size": 2}
    first = runner.run("jsonl", jsonl, model=tiny, timesteps=6, checkpoint=ckpt, progress=False,
                       adaptive={**race, "settled": 0.05})
    with pytest.raises(CheckpointError, match=r"its options differ from this one's"):
        runner.run("jsonl", jsonl, model=tiny, timesteps=6, checkpoint=ckpt, progress=False, adaptive=race)
    again = runner.run("jsonl", jsonl, model=tiny, timesteps=6, checkpoint=ckpt, progress=False,
                       adaptive={**race, "settled": 0.05})
    assert [r["scores"] for r in again.items] == [r["scores"] for r in first.items]


def test_checkpoint_refusal_names_what_differs_and_weights_alone_resume(jsonl, tmp_path, tiny, monkeypatch):
    ckpt = tmp_path / "eval.pt"
    runner.run("jsonl", jsonl, model=tiny, timesteps=3, checkpoint=ckpt, progress=False)
    with pytest.raises(CheckpointError, match=r"belongs to another run: its plan differs from this one's"):
        runner.run("jsonl", jsonl, model=tiny, timesteps=2, checkpoint=ckpt, progress=False)
    # (the options differ too: the text-choice items ran DiffusionITM without the empty prompt's row)
    with pytest.raises(CheckpointError, match=r"its method, options differ"):
        runner.run("jsonl", jsonl, model=tiny, timesteps=3, checkpoint=ckpt, progress=False,
                   method="diffusion_classifier")
    with pytest.raises(CheckpointError, match=r"its items differ from this one's"):
        runner.run("jsonl", jsonl, model=tiny, timesteps=3, checkpoint=ckpt, progress=False, limit=2)
    # other weights: every item is already done, so nothing is scored again, and the report is a fresh
    # run's with those weights (the stored per-timestep scores recombined)
    import fastitm

    calls = [0]
    real = fastitm.score

    def counting(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(runner, "score", counting)
    resumed = runner.run("jsonl", jsonl, model=tiny, timesteps=3, checkpoint=ckpt, progress=False, weights={"kind": "exp", "rate": 7})
    assert calls[0] == 0
    monkeypatch.setattr(runner, "score", real)
    fresh = runner.run("jsonl", jsonl, model=tiny, timesteps=3, progress=False, weights={"kind": "exp", "rate": 7})
    assert resumed.to_json()["items"] == fresh.to_json()["items"] and resumed.metrics == fresh.metrics
    uniform = runner.run("jsonl", jsonl, model=tiny, timesteps=3, progress=False)
    assert resumed.to_json()["items"] != uniform.to_json()["items"]  # the weights did change the scores
    # the checkpoint now holds the exp:7 combination; back to uniform recombines again
    back = runner.run("jsonl", jsonl, model=tiny, timesteps=3, checkpoint=ckpt, progress=False)
    assert back.to_json()["items"] == uniform.to_json()["items"]
    # racing decides rows by the weighted statistic: there other weights are another run
    rc = tmp_path / "race.pt"
    runner.run("jsonl", jsonl, model=tiny, timesteps=3, checkpoint=rc, progress=False, adaptive=True)
    with pytest.raises(CheckpointError, match=r"its options differ"):
        runner.run("jsonl", jsonl, model=tiny, timesteps=3, checkpoint=rc, progress=False, adaptive=True,
                   weights={"kind": "exp", "rate": 7})
    assert torch.load(rc, weights_only=False)["fields"]["task"]
