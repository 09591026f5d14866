"""bench/text_choice_bench.py on a few items: the arms' rows are 2 and 3 per item and timestep (2-way
text choices, with and without the empty prompt's row), and their choices and margins agree."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the bench's own helpers (benchutil), as its scripts find them
spec = importlib.util.spec_from_file_location("text_choice_bench", ROOT / "bench" / "text_choice_bench.py")
tcb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tcb)


def test_the_bench_counts_both_arms_and_finds_the_same_choices(tmp_path, capsys):
    out = tmp_path / "tc.json"
    assert tcb.main(["--images", "2", "--timesteps", "3", "--rounds", "2", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    raw, normed = got["arms"].values()
    items = got["items"]
    assert items >= 2 and raw["normalize"] is False and normed["normalize"] is True
    assert raw["unet_rows"] == items * 2 * 3 and normed["unet_rows"] == items * 3 * 3
    assert got["rows_ratio"] == 1.5 and len(raw["wall_s"]) == len(normed["wall_s"]) == 2
    assert got["same_choices"] == items and got["max_margin_difference"] < 1e-4
    assert raw["accuracy"] == normed["accuracy"]
