"""Evaluation and scoring on torch.distributed: two CPU processes (gloo) against one, and resuming a
killed run."""

import json
import os
import subprocess
import sys

import pytest
import torch

import fastitm
from fastitm import data
from fastitm.engine.distributed import shard_bounds


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    root = tmp_path_factory.mktemp("set")
    ex = data.make_dataset(7, "heldout", seed=5, size=16)
    lines = []
    for n, e in enumerate(ex):
        e.image.save(root / f"{n}.png")
        lines.append({"image": f"{n}.png", "texts": [e.caption, *list(e.negatives.values())[:2]], "label": 0})
    f = root / "set.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines))
    return f


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)
    return env


def test_shards_cover_every_item_once():
    for n in (0, 1, 5, 7, 16):
        for ranks in (1, 2, 3, 4):
            got = [i for r in range(ranks) for i in range(*shard_bounds(n, ranks, r))]
            assert got == list(range(n))


def _eval_here(args, out):
    """The one-process run in this process (no launch): one thread, as the launched ranks run."""
    from fastitm import cli

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["eval", "jsonl", "--model", "tiny", "--timesteps", "3", "--out", str(out),
                         "--no-progress", *args]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "report.json").read_text())


# `fastitm eval` on rank 1 gets SIGTERM (what SLURM or torchrun sends) when it starts its second engine call.
KILL_RANK1 = """
import os, signal, sys
import fastitm.evaluate.runner as runner
from fastitm import cli

real, calls = runner.score, [0]

def score(*a, **k):
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*a, **k)

runner.score = score  # what the eval runner calls
sys.exit(cli.main(sys.argv[1:]))
"""

# Several runs in one launch of two ranks (a launch costs two interpreters' start, ~15 s here): each
# `fastitm eval` of argv[2] (a JSON list of argument lists) in turn, then fastitm.score and the
# torchmetrics Metric with distributed=True, saved by rank 0 to argv[1].
RANKS = """
import json, sys, torch, torch.distributed as dist, fastitm
from fastitm import cli
for args in json.loads(sys.argv[2]):
    if cli.main(args) != 0:
        sys.exit(f"fastitm {' '.join(args)} failed")
model = fastitm.testing.tiny_model(seed=0)
imgs = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))
res = fastitm.score(imgs, ["a red circle", "a cat", "green"], model=model, timesteps=3, latent="sample_per_timestep",
                    distributed=True, batch_size=4)
# The torchmetrics Metric: each rank scores its own pairs (one per update); compute() reduces across ranks.
from fastitm.scorer import DiffusionScore
metric = DiffusionScore(model, timesteps=2, seed=0)
texts = ["a red circle", "a cat", "green", "a blue square"]
for i in range(dist.get_rank(), 4, 2):
    metric.update(imgs[i : i + 1], texts[i : i + 1])
mean = metric.compute()
rank = dist.get_rank()
if rank == 0:
    torch.save({"matrix": res.matrix, "per_t": res.per_timestep, "ranks": res.stats["ranks"], "metric": mean},
               sys.argv[1])
# The exit handlers, run here as the interpreter runs them before it shuts down: what is left of the
# group fastitm made, and the threads still running (gloo names its own), go to argv[1].rank<r>.
import atexit, os
atexit._run_exitfuncs()
atexit._clear()
threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
torch.save({"initialized": dist.is_initialized(), "threads": threads}, f"{sys.argv[1]}.rank{rank}")
"""

# Items of 9 rows (1 image x 3 texts x 3 timesteps: text choices run DiffusionITM without the empty
# prompt's row), batches of 9, calls of 2 batches: windows of 2 items ([0, 1], [2, 3], [4, 5], [6]);
# the ranks get whole windows (items 0-3 and 4-6), so every call is the one a single process makes.
CALLS = ["--batch-size", "9", "--stream", "2"]
RACE = ["--timesteps", "6", "--adaptive", "min_timesteps=2,round_size=2,alpha=0.2"]


def _data(jsonl) -> list[str]:
    """The data and call shape every run here shares (one process and two ranks alike)."""
    return ["--data", str(jsonl), *CALLS]


def _torchrun(args, tmp):
    # TMPDIR: the launcher keeps its per-run folders (torchelastic_*) there and never removes them
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                          env={**_env(), "TMPDIR": str(tmp)}, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def two_ranks(jsonl, tmp_path_factory):
    """The 2-rank runs, in two launches: `fastitm eval` with rank 1 sent SIGTERM at its second window
    (it saves its first window and exits; rank 0 keeps its own finished windows), then in one launch
    the same command rerun from the checkpoints, a racing eval, and the RANKS scoring. Returns the
    folder, the checkpoint shards each rank held after the kill, and the killed launch."""
    root = tmp_path_factory.mktemp("ranks")
    ckpt = root / "ck.pt"

    def shard(r):
        path = root / f"ck.pt.rank{r}-of-2"
        return sorted(torch.load(path, weights_only=False)["done"]) if path.exists() else None

    common = ["eval", "jsonl", "--model", "tiny", "--timesteps", "3", "--no-progress", *_data(jsonl)]
    (root / "kill_rank1.py").write_text(KILL_RANK1)
    killed = _torchrun([str(root / "kill_rank1.py"), *common, "--out", str(root / "killed"), "--checkpoint", str(ckpt)],
                       root)
    after_kill = [shard(0), shard(1)]
    (root / "ranks.py").write_text(RANKS)
    evals = [[*common, "--out", str(root / "two"), "--checkpoint", str(ckpt)], [*common, *RACE, "--out", str(root / "two_r")]]
    done = _torchrun([str(root / "ranks.py"), str(root / "res.pt"), json.dumps(evals)], root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, after_kill, [shard(0), shard(1)], killed


def test_two_gloo_processes_give_the_one_process_report_bit_for_bit(jsonl, two_ranks, tmp_path):
    root, after_kill, after_rerun, killed = two_ranks
    one = _eval_here(_data(jsonl), tmp_path / "one")
    assert killed.returncode != 0 and "stopped by SIGTERM" in killed.stderr, killed.stderr[-3000:]
    assert after_kill[1] == [4, 5]  # the first window of rank 1's shard (4-6), saved on SIGTERM
    two = json.loads((root / "two" / "report.json").read_text())
    assert two["stats"]["ranks"] == 2 and one["stats"]["ranks"] == 1
    for key in ("metrics", "items", "accuracy_vs_timesteps", "plan"):
        assert two[key] == one[key], key  # the same floats, each item once
    # Each rank kept its own checkpoint of its own shard (4 + 3 of 7 items).
    assert after_rerun == [[0, 1, 2, 3], [4, 5, 6]]
    assert two["stats"]["engine_calls"] < one["stats"]["engine_calls"] == 4  # the resumed run: only the rest
    # Racing on 2 ranks: each rank races its own windows; the decisions and scores are those of one
    # process (a rerun of the first command from the checkpoints is checked in one process below).
    one_r = _eval_here([*_data(jsonl), *RACE], tmp_path / "one_r")
    two_r = json.loads((root / "two_r" / "report.json").read_text())
    assert one_r["items"] == two_r["items"] and one_r["metrics"] == two_r["metrics"]
    rows = [it["rows"] for it in one_r["items"]]
    assert min(rows) < max(rows) <= 3 * 6  # some item stopped early, none ran past the plan
    assert one_r["stats"]["unet_rows"] == two_r["stats"]["unet_rows"] == sum(rows)


# Each item is 1 image x 3 texts x 3 timesteps = 9 rows (no empty prompt's row for text choices): with
# batches of 9 and calls of one batch's worth, each engine call holds one item (the kill lands between
# items).
ONE_PER_CALL = {"batch_size": 9, "stream": 1}


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_killed_run_resumes_to_the_same_report(jsonl, tmp_path, monkeypatch, how):
    import signal

    import fastitm.evaluate.runner as runner
    from fastitm.core.interrupts import Terminated

    tiny = fastitm.testing.tiny_model(seed=0)
    full = fastitm.evaluate.run("jsonl", jsonl, model=tiny, timesteps=3, **ONE_PER_CALL)
    ckpt = tmp_path / "eval.pt"
    real, calls = fastitm.score, [0]

    def dying(*a, **k):
        calls[0] += 1
        if calls[0] == 4:
            if how == "sigterm":  # a real SIGTERM, as SLURM or torchrun sends: handled like Ctrl-C
                signal.raise_signal(signal.SIGTERM)
            raise KeyboardInterrupt  # as Ctrl-C between items
        return real(*a, **k)

    monkeypatch.setattr(runner, "score", dying)
    with pytest.raises(Terminated if how == "sigterm" else KeyboardInterrupt):
        runner.run("jsonl", jsonl, model=tiny, timesteps=3, checkpoint=ckpt, checkpoint_every=1e9, **ONE_PER_CALL)
    monkeypatch.setattr(runner, "score", real)
    assert ckpt.exists() and len(torch.load(ckpt, weights_only=False)["done"]) == 3
    counted = [0]

    def counting(*a, **k):
        counted[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(runner, "score", counting)
    resumed = runner.run("jsonl", jsonl, model=tiny, timesteps=3, checkpoint=ckpt, **ONE_PER_CALL)
    assert counted[0] == 4  # only the missing items
    assert resumed.to_json()["items"] == full.to_json()["items"] and resumed.metrics == full.metrics
    assert resumed.curve == full.curve
    with pytest.raises(ValueError, match="belongs to another run"):
        runner.run("jsonl", jsonl, model=tiny, timesteps=2, checkpoint=ckpt)


def test_the_group_made_for_a_run_is_gone_before_the_interpreter_shuts_down(two_ranks):
    """The group `fastitm eval` made is destroyed at exit, and destroying it joins gloo's threads. When
    diffusers imported torch.distributed.nn after the group existed, that module's default arguments
    kept the group alive, its worker threads ran into interpreter shutdown, and a rank could abort
    there ("terminate called without an active exception") after its work was done."""
    for r in range(2):
        left = torch.load(two_ranks[0] / f"res.pt.rank{r}")
        assert not left["initialized"], r
        assert left["threads"] and not [t for t in left["threads"] if "gloo" in t], (r, left["threads"])


def test_score_distributed_equals_one_process(two_ranks):
    out = two_ranks[0] / "res.pt"
    got = torch.load(out)
    model = fastitm.testing.tiny_model(seed=0)
    imgs = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    one = fastitm.score(imgs, ["a red circle", "a cat", "green"], model=model, timesteps=3,
                        latent="sample_per_timestep", distributed=True, batch_size=4)  # no group: one process
    assert got["ranks"] == 2
    # Image shards keep their global seeds: the same latents, the same scores (to fp32 rounding of
    # differently packed batches).
    torch.testing.assert_close(got["matrix"], one.matrix, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["per_t"], one.per_timestep, rtol=1e-5, atol=1e-5)
    from fastitm.scorer import DiffusionScore

    metric = DiffusionScore(model, timesteps=2, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run: the same pair scores to the bit
    try:
        for i, t in enumerate(["a red circle", "a cat", "green", "a blue square"]):
            metric.update(imgs[i : i + 1], [t])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got["metric"], metric.compute())  # their mean exactly rounded, whatever the order
