"""Streaming training input: deterministic order, ranks x workers see each record once, exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import losses, make_records, overrides

from dvsft.core.convert import convert
from dvsft.data.streaming import POSITION, EpochDataLoader, Ranges, StreamingSamples
from dvsft.training.config import load_config
from dvsft.training.train import prepare

SRC = Path(__file__).resolve().parents[1] / "src"


def shards(tmp: Path, n: int, rows_per_shard: int = 2, seed: int = 0) -> Path:
    jsonl = make_records(tmp / "raw", n=n, seed=seed)
    convert(jsonl, tmp / "shards", "parquet", rows_per_shard=rows_per_shard, embed_images=True)
    return tmp / "shards"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return shards(tmp_path_factory.mktemp("stream"), n=10)


def ids_of(batches) -> list[list[str]]:
    return [[s["id"] for s in b] for b in batches]


def loader(ds: StreamingSamples, workers: int = 0, batch_size: int = 2) -> EpochDataLoader:
    ds.batch_size = batch_size
    return EpochDataLoader(ds, batch_size=batch_size, collate_fn=list, num_workers=workers)


def test_order_is_deterministic_per_seed_and_changes_with_the_epoch(data):
    a, b, c = (StreamingSamples([data], seed=s, window_rows=3) for s in (0, 0, 1))
    assert a.order_ids(0) == b.order_ids(0) != c.order_ids(0)
    assert a.order_ids(0) != a.order_ids(1)
    assert sorted(a.order_ids(0)) == sorted(f"doc{i}" for i in range(10))
    first = [s["id"] for s in a]
    assert first == a.order_ids(0)  # one rank, no workers: the global order itself
    assert all(isinstance(s["image_bytes"], bytes) and s[POSITION][0] == 0 for s in a)


def expected_split(ds: StreamingSamples, world: int, rank: int, epoch: int = 0) -> list[str]:
    """What split_dataset_by_node's strategies give a rank, written out: whole windows ``w % world == rank``
    (``shards``, or ``auto`` when the window count divides by ``world``), else position ``g % world == rank``."""
    windows = ds.window_ids(epoch)
    if ds.split == "shards" or (ds.split == "auto" and len(windows) % world == 0):
        return [i for w in windows[rank::world] for i in w]
    return [i for w in windows for i in w][rank::world]


@pytest.mark.parametrize(
    "world, split, workers",
    [(3, "auto", 0), (3, "auto", 2), (2, "auto", 2), (4, "auto", 0), (3, "examples", 2), (3, "shards", 0)],
)
def test_ranks_and_workers_see_each_record_once_in_the_same_batches(data, world, split, workers):
    # 10 records in row groups of 2, windows of about 3 rows: 3 windows of 4, 4 and 2 records, so `auto` gives
    # 3 ranks whole windows (shards) and 2 or 4 ranks every world-th record (examples)
    probe = StreamingSamples([data], seed=5, window_rows=3, split=split)
    assert sorted(len(w) for w in probe.window_ids(0)) == [2, 4, 4]
    seen, counts = [], []
    for rank in range(world):
        ds = StreamingSamples([data], seed=5, window_rows=3, split=split)
        ds.rank, ds.world_size = rank, world
        batches = ids_of(loader(ds, workers))
        mine = [i for b in batches for i in b]
        seen += mine
        counts.append(len(mine))
        ds0 = StreamingSamples([data], seed=5, window_rows=3, split=split)
        ds0.rank, ds0.world_size = rank, world
        assert batches == ids_of(loader(ds0, 0))  # workers do not change the batches or their order
        assert mine == expected_split(ds, world, rank)
        assert ds.rows_per_rank(0) == len(mine)
    assert sorted(seen) == sorted(f"doc{i}" for i in range(10))  # each record once per epoch across the ranks
    whole_windows = split == "shards" or (split == "auto" and world == 3)
    assert sorted(counts) == ([2, 4, 4] if whole_windows else sorted(len(range(r, 10, world)) for r in range(world)))


def test_split_shards_is_refused_with_fewer_windows_than_ranks(data):
    ds = StreamingSamples([data], seed=5, window_rows=3, split="shards")
    ds.rank, ds.world_size = 0, 4
    with pytest.raises(ValueError, match="num_shards=3"):
        next(iter(ds))
    with pytest.raises(ValueError, match="split"):
        StreamingSamples([data], split="rows")


def test_resume_skips_exactly_what_was_trained(data):
    ds = StreamingSamples([data], seed=2, window_rows=4)
    ds.set_epoch(0)
    batches = list(loader(ds, 2))
    for b in batches[:2]:
        ds.mark_trained(torch.tensor([s[POSITION] for s in b]))
    state = json.loads(json.dumps(ds.state_dict()))
    assert state["consumed"] == [[0, 4]] and state["offset"] == 0
    again = StreamingSamples([data], seed=2, window_rows=4)
    again.load_state_dict(state)
    again.set_epoch(0)
    assert ids_of(loader(again, 2)) == ids_of(batches[2:])
    for b in batches[2:]:
        again.mark_trained(torch.tensor([s[POSITION] for s in b]))
    finished = StreamingSamples([data], seed=2, window_rows=4)
    finished.load_state_dict(again.state_dict())
    assert finished.epoch == 1  # a finished epoch resumes at the next one
    with pytest.raises(ValueError, match="cannot resume the data stream"):
        StreamingSamples([data], seed=3).load_state_dict(state)
    r = Ranges.of([[0, 3], [5, 6]])
    assert 2 in r and 3 not in r and r.first_missing() == 3 and r.count() == 4 and r.spans() == [[0, 3], [5, 6]]


@pytest.mark.parametrize("world", [1, 3])
def test_endless_stream_crosses_epochs_in_full_batches_and_resumes_across_them(data, world):
    def stream(rank: int, state=None) -> StreamingSamples:
        ds = StreamingSamples([data], seed=7, window_rows=3)
        ds.rank, ds.world_size, ds.endless = rank, world, True
        if state is not None:
            ds.load_state_dict(state)
        ds.set_epoch(0)
        return ds

    for rank in range(world):
        ds = stream(rank)
        it = iter(loader(ds, workers=2, batch_size=3))
        batches = [next(it) for _ in range(8)]  # 24 samples: epochs 0, 1, 2, ... of this rank
        assert all(len(b) == 3 for b in batches)  # full batches across the epoch ends
        flat = [s for b in batches for s in b]
        cs = [s[POSITION][2] for s in flat]
        assert cs == list(range(24))
        expected = [i for e in range(24) for i in expected_split(ds, world, rank, e)][:24]
        assert [s["id"] for s in flat] == expected  # each epoch's split, one after the other
        for b in batches[:5]:
            ds.mark_trained(torch.tensor([s[POSITION] for s in b]))
        state = json.loads(json.dumps(ds.state_dict()))
        assert state["epoch"] == max(s[POSITION][0] for s in flat[:15])
        again = iter(loader(stream(rank, state), workers=2, batch_size=3))
        assert ids_of([next(again) for _ in range(3)]) == ids_of(batches[5:])  # the same batches after a resume


def test_an_endless_stream_with_no_records_for_a_rank_is_refused(tmp_path):
    one = shards(tmp_path, n=1)
    ds = StreamingSamples([one])
    ds.rank, ds.world_size, ds.endless = 1, 2, True
    with pytest.raises(ValueError, match="1 records for 2 ranks: rank 1 gets none"):
        next(iter(ds))


def test_jsonl_is_refused_with_the_convert_command(tmp_path):
    jsonl = make_records(tmp_path, n=1)
    with pytest.raises(ValueError, match="dvsft convert"):
        StreamingSamples([jsonl])


STREAM = dict(
    streaming=True, stream_window=3, max_steps=6, save_steps=3, save_final=False, per_device_train_batch_size=1
)


@pytest.mark.slow
def test_killed_then_resumed_run_continues_the_same_sample_sequence(tiny_dir, data, tmp_path):
    common = dict(STREAM, dataloader_num_workers=2)
    full = prepare(load_config(None, overrides(tiny_dir, data, tmp_path / "full", **common)))
    full.trainer.train()
    sequence = full.trainer.trained_samples
    assert [s[0] for s in sequence] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    assert [s[3] for s in sequence[:10]] == full.trainer.train_dataset.order_ids(0)  # epoch 0, then epoch 1
    assert [s[1] for s in sequence] == [0] * 10 + [1] * 2

    args = overrides(tiny_dir, data, tmp_path / "killed", **common)
    script = textwrap.dedent(
        """
        import os, signal, sys
        from transformers import TrainerCallback
        from dvsft.training.config import load_config
        from dvsft.training.train import train

        class Kill(TrainerCallback):
            def on_save(self, args, state, control, **kw):
                os.kill(os.getpid(), signal.SIGKILL)

        train(load_config(None, sys.argv[1:]), callbacks=[Kill()])
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    state = json.loads((tmp_path / "killed" / "checkpoint-3" / "data_state.json").read_text())
    assert state["ranks"][0]["consumed"] == [[0, 6]]
    resumed = prepare(load_config(None, [*args, "--resume", "true"]))
    resumed.trainer.train(resume_from_checkpoint=resumed.resume)
    assert resumed.trainer.trained_samples == sequence[6:]
    assert losses(resumed.log_callback.rows) == pytest.approx(losses(full.log_callback.rows), abs=1e-5)  # 1-3 kept


TWO_RANKS = textwrap.dedent(
    """
    import atexit, json, os, sys
    import torch
    from dvsft.training.config import load_config
    from dvsft.training.train import prepare

    def group_at_exit():  # registered first, so it runs after every handler registered later
        with open(os.path.join(sys.argv[1], f"group{os.environ['RANK']}.txt"), "w") as f:
            f.write(str(torch.distributed.is_initialized()))

    atexit.register(group_at_exit)
    run = prepare(load_config(None, sys.argv[2:]))
    run.trainer.train()
    with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(run.trainer.trained_samples, f)
    """
)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("n, rows_per_shard, split", [(7, 2, "auto"), (8, 3, "examples")])
def test_two_processes_see_each_sample_once_per_epoch(tiny_dir, tmp_path, n, rows_per_shard, split):
    # auto: 7 records in 2 windows of 3 and 4, a whole window per rank, 2 micro-batches per step: the ranks'
    # epochs end at different micro-batches, one of them inside an accumulation
    # examples: every other record of 8, 4 per rank
    data = shards(tmp_path, n=n, rows_per_shard=rows_per_shard, seed=4)
    run = dict(STREAM, stream_split=split, max_steps=4, save_steps=4, global_batch_size=4)  # 8 micro-batches
    probe = StreamingSamples([data], seed=0, window_rows=3, split=split)
    if split == "auto":
        assert sorted(len(w) for w in probe.window_ids(0)) == [3, 4]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA", "LOCAL_RANK", "RANK", "WORLD_SIZE"))}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(
        [*cmd, str(tmp_path), *overrides(tiny_dir, data, tmp_path / "two", **run)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = json.loads((tmp_path / "two" / "checkpoint-4" / "data_state.json").read_text())
    assert state["world_size"] == 2
    seen: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for rank, rank_state in enumerate(state["ranks"]):
        trained = json.loads((tmp_path / f"rank{rank}.json").read_text())  # (step, epoch, position, id)
        assert [t[0] for t in trained] == [1, 1, 2, 2, 3, 3, 4, 4]  # every rank: 4 steps of 2 micro-batches
        stream = [(e, j, i) for e in range(3) for j, i in enumerate(expected_split(probe, 2, rank, e))]
        assert [tuple(t[1:]) for t in trained] == stream[:8]  # this rank's split, epoch after epoch
        for e, _, i in stream[:8]:
            seen[e].append(i)
        last = stream[7]
        assert rank_state["epoch"] == last[0] and rank_state["consumed"] == [[0, last[1] + 1]]
    assert sorted(seen[0]) == sorted(f"doc{i}" for i in range(n))  # every sample once in epoch 0, none twice
    assert all(len(set(seen[e])) == len(seen[e]) for e in (1, 2))  # none twice in what was trained of the next
    # the process group ends before the interpreter does (gloo left to finalization aborted a rank now and then)
    assert [(tmp_path / f"group{rank}.txt").read_text() for rank in (0, 1)] == ["False", "False"]


def test_streams_a_datasets_folder_memory_mapped(tmp_path):
    jsonl = make_records(tmp_path / "raw", n=5)
    convert(jsonl, tmp_path / "ds", "datasets", embed_images=True, rows_per_shard=2)
    ds = StreamingSamples([tmp_path / "ds"], seed=1, window_rows=2)
    assert len(ds.units) >= 1 and ds.rows == 5
    assert sorted(s["id"] for s in ds) == [f"doc{i}" for i in range(5)]


def test_bad_records_are_skipped_lazily_with_a_warning(tmp_path, caplog):
    jsonl = make_records(tmp_path / "raw", n=4)
    convert(jsonl, tmp_path / "shards", "parquet")
    (tmp_path / "raw" / "img1.png").unlink()
    ds = StreamingSamples([tmp_path / "shards"], seed=0)
    assert sorted(s["id"] for s in ds) == ["doc0", "doc2", "doc3"]
    assert "record doc1: image file not found" in caplog.text and "part-00000.parquet:2" in caplog.text
