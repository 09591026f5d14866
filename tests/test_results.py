"""fastitm eval --results appends one record per run (report.json's content) and fastitm results prints
the runs as one table: checked against the two runs' report.json files."""

import csv
import io
import json

import pytest

from fastitm.cli import main
from fastitm.testing import write_jsonl_set


@pytest.fixture
def jsonl(tmp_path):
    return write_jsonl_set(tmp_path, 3, seed=2)


def test_two_runs_line_up_in_one_table(jsonl, tmp_path, capsys):
    results = tmp_path / "runs.jsonl"
    reports = []
    for method in ("diffusion_itm", "diffusion_classifier"):
        out = tmp_path / method
        assert main(["eval", "jsonl", "--data", str(jsonl), "--model", "tiny", "--method", method, "--timesteps", "2",
                     "--out", str(out), "--no-progress", "--results", str(results)]) == 0
        reports.append(json.loads((out / "report.json").read_text()))
    capsys.readouterr()
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(records) == 2
    for rec, rep in zip(records, reports, strict=True):
        # the record is report.json's content, less each item's per-timestep scores (report.json's alone)
        assert all("per_timestep" in i for i in rep["items"]) and not any("per_timestep" in i for i in rec["items"])
        rep["items"] = [{k: v for k, v in i.items() if k != "per_timestep"} for i in rep["items"]]
        assert {k: v for k, v in rec.items() if k != "recorded"} == rep
        assert rep["model"]["family"] == "sd" and len(rep["model"]["digest"]) == 64
        assert rep["stats"]["wall_s"] > 0 and rep["model"]["versions"]["torch"]
    assert reports[0]["model"]["digest"] == reports[1]["model"]["digest"]  # the same weights
    assert main(["results", str(results)]) == 0
    md = capsys.readouterr().out.splitlines()
    # settings every run shares are said once; the method and its options, which differ, are columns
    assert md[0].startswith("every run: data ") and "; timesteps 2; seed 0; weights uniform" in md[0]
    assert md[2].startswith("| recorded | task | method | options | accuracy |") and len(md) == 6
    assert "| diffusion_classifier |" in md[5]
    assert main(["results", str(results), "--csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["method"] for r in table] == ["diffusion_itm", "diffusion_classifier"]
    for row, rep in zip(table, reports, strict=True):
        assert float(row["accuracy"]) == pytest.approx(rep["metrics"]["accuracy"])
        assert int(row["timesteps"]) == 2 and int(row["unet_rows"]) == rep["stats"]["unet_rows"]
        assert row["data"] == str(jsonl) and row["dtype"] == "float32" and row["scheme"] == "grid"
        assert row["latent"] == "mean" and row["weights"] == "uniform" and row["split"] == row["limit"] == ""
    # a truncated line and a foreign one: the good records still print, each bad line is named
    good = results.read_text()
    results.write_text(good + good.splitlines()[0][:80] + "\n" + json.dumps({"other": 1}) + "\n")
    assert main(["results", str(results)]) == 0
    got = capsys.readouterr()
    assert len(got.out.splitlines()) == 6
    assert f"{results}:3: not a JSON record" in got.err and f"{results}:4: not a fastitm eval record" in got.err
    results.write_text("not json\n")
    assert main(["results", str(results)]) == 2
    assert f"{results}:1: not a JSON record" in capsys.readouterr().err


def test_results_tell_apart_what_makes_runs_differ(jsonl, tmp_path, capsys):
    results = tmp_path / "runs.jsonl"
    runs = [[], ["--weights", "exp:7"], ["--limit", "2"], ["--option", "err=mse"], ["--latent", "sample"],
            ["--image-cache"], ["--split", "x", "--dtype", "fp32"]]
    for n, extra in enumerate(runs):
        assert main(["eval", "jsonl", "--data", str(jsonl), "--model", "tiny", "--timesteps", "2", "--no-progress",
                     "--out", str(tmp_path / f"o{n}"), "--results", str(results), *extra]) == 0
    capsys.readouterr()
    assert main(["results", str(results), "--csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["weights"] for r in table] == ["uniform", '{"kind": "exp", "rate": 7.0}', *["uniform"] * 5]
    assert [r["limit"] for r in table] == ["", "", "2", "", "", "", ""]
    assert [json.loads(r["options"])["err"] for r in table] == ["l2"] * 3 + ["mse"] + ["l2"] * 3
    assert [r["latent"] for r in table] == ["mean"] * 4 + ["sample", "mean", "mean"]
    assert [r["image_cache"] for r in table] == [""] * 5 + ["yes", ""]
    assert [r["split"] for r in table] == [""] * 6 + ["x"]
    # no two runs print the same settings in the markdown table
    assert main(["results", str(results)]) == 0
    from fastitm.evaluate.results import COLUMNS

    lines = capsys.readouterr().out.splitlines()
    head = next(line for line in lines if line.startswith("| recorded"))
    names = [c.strip() for c in head.split("|")[1:-1]]
    shown = [n for n, c in enumerate(names) if c in COLUMNS and c not in ("recorded", "task")]
    body = [[c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("| 20")]
    assert len(body) == 7 and len({tuple(r[n] for n in shown) for r in body}) == 7
