"""Data: IDX decoding, whole-batch fetches, an order that does not depend on the process count."""

from __future__ import annotations

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler

from trainer.data import (
    DataError,
    EpochSampler,
    TensorImages,
    load_split,
    make_loader,
    model_input,
)


def test_idx_files_decode_to_uint8_tensors(tiny_data):
    split = load_split("mnist", tiny_data, train=False)
    assert split.images.dtype == torch.uint8 and split.images.shape == (1001, 28, 28)
    assert split.labels.dtype == torch.int64 and int(split.labels.max()) <= 9


def test_truncated_idx_file_is_a_data_error(tiny_data, tmp_path):
    import shutil

    shutil.copytree(tiny_data / "MNIST", tmp_path / "MNIST")
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="t10k|IDX|MNIST"):
        load_split("mnist", tmp_path, train=False)


def test_gzipped_idx_files_as_published_are_read_as_they_are(tiny_data, tmp_path, run_main):
    """The .gz files of the data set's own site, not unpacked: read directly, offline; a broken one
    is one line naming it."""
    import gzip

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in (tiny_data / "MNIST" / "raw").iterdir():
        (raw / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()))
    for train in (True, False):
        plain, packed = load_split("mnist", tiny_data, train), load_split("mnist", tmp_path, train, download=False)
        assert torch.equal(plain.images, packed.images) and torch.equal(plain.labels, packed.labels)
    result = run_main(["--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "runs"), "--epochs", "1",
                       "--limit-train-batches", "1", "--batch-size", "64", "--progress", "plain",
                       "--val-split", "0"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    broken = raw / "t10k-labels-idx1-ubyte.gz"
    broken.write_bytes(broken.read_bytes()[:30])
    with pytest.raises(DataError, match=f"cannot read {broken}"):
        load_split("mnist", tmp_path, train=False, download=False)


def test_batches_are_fetched_whole_not_per_image(tiny_data, monkeypatch):
    split = load_split("mnist", tiny_data, train=True)
    calls = {"item": 0}
    original = TensorImages.__getitem__

    def counting(self, index):
        calls["item"] += 1
        return original(self, index)

    monkeypatch.setattr(TensorImages, "__getitem__", counting)
    loader = make_loader(split, 64, train=True, seed=0, device=torch.device("cpu"))
    batches = list(loader)
    assert calls["item"] == 0
    assert len(batches) == 1536 // 64 and batches[0][0].shape == (64, 28, 28)
    assert batches[0][0].dtype == torch.uint8  # scaling happens on the device, later


def test_model_input_is_scaled_like_totensor():
    images = torch.tensor([[[0, 128, 255]]], dtype=torch.uint8)
    x = model_input(images)
    assert x.shape == (1, 1, 1, 3)
    assert torch.equal(x.flatten(), torch.tensor([0, 128, 255]) / 255)
    assert model_input(torch.zeros(2, 28, 28, dtype=torch.uint8), channels_last=True).is_contiguous(
        memory_format=torch.channels_last
    )


def shard_indices(sampler: EpochSampler, batch: int, world: int) -> list[list[int]]:
    """What each of `world` processes draws, via accelerate's own batch sharding."""
    order, per_rank = sampler.order().tolist(), []
    for rank in range(world):
        shard = BatchSamplerShard(BatchSampler(sampler, batch, drop_last=True), world, rank)
        per_rank.append([order[position] for b in shard for position in b])
    return per_rank


def interleave(per_rank: list[list[int]], batch: int) -> list[int]:
    """Global order: step by step, process by process."""
    steps = len(per_rank[0]) // batch
    return [i for s in range(steps) for r in per_rank for i in r[s * batch : (s + 1) * batch]]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 3), (4, 2)])
def test_interrupted_epoch_sees_each_sample_at_most_once_across_world_sizes(before, after):
    n, batch, steps_done = 1000, 16, 5
    sampler = EpochSampler(n, seed=12)
    sampler.set_position(epoch=3)
    full = interleave(shard_indices(sampler, batch, 1), batch)
    assert full == sampler_order(n, 3)[: len(full)]  # one process walks the permutation in order
    sampler.set_position(3)
    first = interleave(shard_indices(sampler, batch, before), batch)[: steps_done * before * batch]
    sampler.set_position(3, start=len(first))
    rest = interleave(shard_indices(sampler, batch, after), batch)
    seen = first + rest
    assert len(seen) == len(set(seen))  # nothing twice
    assert seen == sampler_order(n, 3)[: len(seen)]  # nothing skipped: a prefix of the epoch's order
    assert n - len(seen) < after * batch + batch  # only the incomplete last step is left out


def sampler_order(n: int, epoch: int) -> list[int]:
    s = EpochSampler(n, seed=12)
    s.set_position(epoch)
    order = s.order().tolist()
    return [order[position] for position in s]


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert sampler_order(100, 1) == sampler_order(100, 1)
    assert sampler_order(100, 1) != sampler_order(100, 2)
    assert sorted(sampler_order(100, 1)) == list(range(100))


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 8 cores are pretended
def test_a_python_dataset_gets_workers_and_pinned_memory_on_a_gpu_only(monkeypatch):
    """DataLoader workers help where the device waits for the host (a GPU), not on the CPU, where
    they would take the cores training uses."""
    from torch.utils.data import Dataset

    from trainer import data

    class Plain(Dataset):
        def __len__(self) -> int:
            return 40

        def __getitem__(self, i: int):
            return torch.zeros(3), i % 2

    monkeypatch.setattr(data, "cores", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    on_cpu = data.make_loader(Plain(), 8, train=True, seed=0, device=torch.device("cpu"))
    assert on_cpu.num_workers == 0 and not on_cpu.pin_memory
    on_gpu = data.make_loader(Plain(), 8, train=True, seed=0, device=torch.device("cuda"))
    assert on_gpu.num_workers == 3 and on_gpu.pin_memory  # 8 cores / 2 processes, one left for the loop
    assert data.make_loader(Plain(), 8, train=True, seed=0, device=torch.device("cuda"), num_workers=0).num_workers == 0
