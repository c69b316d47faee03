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
from test_train import losses, make_records, overrides, tiny_dir  # noqa: F401  (tiny_dir is a fixture)

from dvsft.data.convert import convert
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


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_see_each_record_once_in_the_same_batches(data, workers):
    seen = []
    for rank in range(3):
        ds = StreamingSamples([data], seed=5, window_rows=3)
        ds.rank, ds.world_size = rank, 3
        batches = ids_of(loader(ds, workers))
        seen += [i for b in batches for i in b]
        ds0 = StreamingSamples([data], seed=5, window_rows=3)
        ds0.rank, ds0.world_size = rank, 3
        assert batches == ids_of(loader(ds0, 0))  # workers do not change the batches or their order
        assert [i for b in batches for i in b] == ds.order_ids(0)[rank::3]
    assert sorted(seen) == sorted(f"doc{i}" for i in range(10))


def test_resume_skips_exactly_what_was_trained(data):
    ds = StreamingSamples([data], seed=2, window_rows=4)
    ds.set_epoch(0)
    batches = list(loader(ds, 2))
    for b in batches[:2]:
        ds.mark_trained(torch.tensor([s[POSITION] for s in b]))
    state = json.loads(json.dumps(ds.state_dict()))
    assert state["consumed"] == [[0, 4]]
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


def test_jsonl_is_refused_with_the_convert_command(tmp_path):
    jsonl = make_records(tmp_path, n=1)
    with pytest.raises(ValueError, match="dvsft convert"):
        StreamingSamples([jsonl])


STREAM = dict(
    streaming=True, stream_window=3, max_steps=6, save_steps=3, save_final=False, per_device_train_batch_size=1
)


def test_killed_then_resumed_run_continues_the_same_sample_sequence(tiny_dir, data, tmp_path):  # noqa: F811
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


def test_two_processes_see_each_sample_once_per_epoch(tiny_dir, tmp_path):  # noqa: F811
    data = shards(tmp_path, n=8, rows_per_shard=3, seed=4)
    run = dict(STREAM, max_steps=4, save_steps=4, global_batch_size=2)  # 8 samples / (2 ranks x 1) = 4 steps
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA", "LOCAL_RANK", "RANK", "WORLD_SIZE"))}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dvsft.cli"]
    proc = subprocess.run(
        [*cmd, "train", *overrides(tiny_dir, data, tmp_path / "two", **run)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = json.loads((tmp_path / "two" / "checkpoint-4" / "data_state.json").read_text())
    assert state["world_size"] == 2
    order = StreamingSamples([data], seed=0, window_rows=3).order_ids(0)
    seen = []
    for rank, rank_state in enumerate(state["ranks"]):
        assert rank_state["epoch"] == 0 and rank_state["consumed"] == [[0, 4]]
        seen += [order[j * 2 + rank] for j in range(4)]
    assert sorted(seen) == sorted(f"doc{i}" for i in range(8))  # every sample once, none twice


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
