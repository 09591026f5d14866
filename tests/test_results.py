"""fastitm eval --results appends one record per run (report.json's content) and fastitm results prints
the runs as one table: checked against the two runs' report.json files."""

import csv
import io
import json

import pytest

from fastitm import data
from fastitm.cli import main


@pytest.fixture
def jsonl(tmp_path):
    lines = []
    for n, e in enumerate(data.make_dataset(3, "heldout", seed=2, size=16)):
        e.image.save(tmp_path / f"{n}.png")
        lines.append({"image": f"{n}.png", "texts": [e.caption, next(iter(e.negatives.values()))], "label": 0})
    f = tmp_path / "set.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines))
    return f


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
    assert md[0].startswith("| recorded | task | model | method |") and len(md) == 4
    assert "| diffusion_classifier |" in md[3]
    assert main(["results", str(results), "--csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["method"] for r in table] == ["diffusion_itm", "diffusion_classifier"]
    for row, rep in zip(table, reports, strict=True):
        assert float(row["accuracy"]) == pytest.approx(rep["metrics"]["accuracy"])
        assert int(row["timesteps"]) == 2 and int(row["unet_rows"]) == rep["stats"]["unet_rows"]
    results.write_text(results.read_text() + "not json\n")
    assert main(["results", str(results)]) == 2
    assert f"{results}:3: not a JSON record" in capsys.readouterr().err
