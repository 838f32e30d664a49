"""TokenBatches and iter_sequential against shards whose contents are known by construction:
shard A holds 0..999, shard B 10000..18999, so a row tells which shard and offset it came from."""
import io
import os

import numpy as np
import pytest
import torch

from training.dataloader import TokenBatches, iter_sequential
from training.shards import HEADER_BYTES, HEADER_INTS, ShardError, write_shard

BLOCK = 16


@pytest.fixture
def data_dir(tmp_path):
    write_shard(str(tmp_path / "train_000000.bin"), np.arange(0, 1000))
    write_shard(str(tmp_path / "train_000001.bin"), np.arange(10000, 19000))
    write_shard(str(tmp_path / "val_000000.bin"), np.arange(30000, 30100))
    write_shard(str(tmp_path / "val_000001.bin"), np.arange(40000, 40040))
    return str(tmp_path)


def test_rows_are_contiguous_windows_of_one_shard_and_y_is_x_shifted(data_dir):
    x, y = TokenBatches(data_dir, "train", 64, BLOCK).get(3, 1)
    assert x.shape == y.shape == (64, BLOCK) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal(x - x[:, :1], torch.arange(BLOCK).expand(64, BLOCK))  # consecutive: no shard crossing
    in_a = (x[:, 0] >= 0) & (y[:, -1] <= 999)
    in_b = (x[:, 0] >= 10000) & (y[:, -1] <= 18999)
    assert bool((in_a | in_b).all())


def test_shards_are_chosen_in_proportion_to_their_windows(data_dir):
    n = 4000
    x, _ = TokenBatches(data_dir, "train", n, BLOCK).get(0)
    p_a = (1000 - BLOCK) / ((1000 - BLOCK) + (9000 - BLOCK))
    frac_a = (x[:, 0] < 10000).float().mean().item()
    assert abs(frac_a - p_a) < 5 * (p_a * (1 - p_a) / n) ** 0.5


def test_every_window_of_a_shard_is_drawn_including_both_ends(tmp_path):
    write_shard(str(tmp_path / "train_000000.bin"), np.arange(100, 100 + BLOCK + 3))  # exactly 3 windows
    x, y = TokenBatches(str(tmp_path), "train", 300, BLOCK).get(0)
    assert sorted(set(x[:, 0].tolist())) == [100, 101, 102]
    assert y[:, -1].max().item() == 100 + BLOCK + 2  # the shard's last token is reachable


def test_a_shard_of_exactly_block_plus_one_tokens_gives_its_single_window(tmp_path):
    write_shard(str(tmp_path / "train_000000.bin"), np.arange(5, 5 + BLOCK + 1))
    x, y = TokenBatches(str(tmp_path), "train", 4, BLOCK).get(0)
    assert torch.equal(x, torch.arange(5, 5 + BLOCK).expand(4, BLOCK))
    assert torch.equal(y, torch.arange(6, 6 + BLOCK).expand(4, BLOCK))


def test_stateless_batches_repeat_across_loaders_and_differ_across_rank_step_micro_step(data_dir):
    a = TokenBatches(data_dir, "train", 8, BLOCK, rank=1, world_size=2, seed=42)
    b = TokenBatches(data_dir, "train", 8, BLOCK, rank=1, world_size=2, seed=42)
    for step, micro in [(0, 0), (7, 2), (123456, 0)]:
        xa, ya = a.get(step, micro)
        xb, yb = b.get(step, micro)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    ref = a.get(5, 1)[0]
    others = [TokenBatches(data_dir, "train", 8, BLOCK, rank=0, world_size=2, seed=42).get(5, 1)[0],
              a.get(6, 1)[0], a.get(5, 0)[0],
              TokenBatches(data_dir, "train", 8, BLOCK, rank=1, world_size=2, seed=43).get(5, 1)[0]]
    for other in others:
        assert not torch.equal(ref, other)


def test_stateless_resume_sees_the_same_batch_as_the_uninterrupted_run(data_dir):
    run = TokenBatches(data_dir, "train", 4, BLOCK, seed=7)
    seen = {(s, m): run.get(s, m)[0] for s in range(6) for m in range(3)}
    fresh = TokenBatches(data_dir, "train", 4, BLOCK, seed=7)  # a resumed process starts here
    for key in [(5, 1), (3, 2), (0, 0)]:
        assert torch.equal(fresh.get(*key)[0], seen[key])


def test_stateful_state_dict_round_trip_continues_the_exact_stream(data_dir):
    a = TokenBatches(data_dir, "train", 4, BLOCK, rank=1, world_size=2, mode="stateful")
    for _ in range(3):
        a.get()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # as the trainer checkpoints it
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    expected = [a.get()[0] for _ in range(2)]

    b = TokenBatches(data_dir, "train", 4, BLOCK, rank=1, world_size=2, mode="stateful")
    first_without_state = b.get()[0]
    b.load_state_dict(state)
    assert [torch.equal(b.get()[0], e) for e in expected] == [True, True]
    assert not torch.equal(first_without_state, expected[0])  # the restore is what makes them equal

    c = TokenBatches(data_dir, "train", 4, BLOCK, rank=0, world_size=2, mode="stateful")
    with pytest.raises(ValueError, match="rank"):
        c.load_state_dict(state)


def test_stateful_ranks_draw_different_streams(data_dir):
    r0 = TokenBatches(data_dir, "train", 8, BLOCK, rank=0, world_size=2, mode="stateful")
    r1 = TokenBatches(data_dir, "train", 8, BLOCK, rank=1, world_size=2, mode="stateful")
    assert not torch.equal(r0.get()[0], r1.get()[0])


def test_bad_arguments_fail_clearly(data_dir):
    with pytest.raises(ValueError, match="shuffled"):
        TokenBatches(data_dir, "train", 4, BLOCK, mode="shuffled")
    with pytest.raises(ValueError, match="rank 2"):
        TokenBatches(data_dir, "train", 4, BLOCK, rank=2, world_size=2)
    with pytest.raises(ValueError, match="non-negative"):
        TokenBatches(data_dir, "train", 4, BLOCK).get(-1)


def test_missing_truncated_foreign_and_short_shards_fail_clearly(tmp_path, data_dir):
    with pytest.raises(ShardError, match="no 'train' shards"):
        TokenBatches(str(tmp_path / "nowhere"), "train", 4, BLOCK)

    path = os.path.join(data_dir, "train_000001.bin")
    with open(path, "r+b") as f:
        f.truncate(HEADER_BYTES + 2 * 9000 - 10)  # a copy that stopped early
    with pytest.raises(ShardError, match="corrupt"):
        TokenBatches(data_dir, "train", 4, BLOCK)
    with pytest.raises(ShardError, match="corrupt"):
        next(iter_sequential(data_dir, "train", BLOCK))

    with open(path, "wb") as f:
        f.write(np.arange(HEADER_BYTES).astype(np.uint8).tobytes() * 3)  # not a shard at all
    with pytest.raises(ShardError, match="not a token shard"):
        TokenBatches(data_dir, "train", 4, BLOCK)

    write_shard(path, np.arange(BLOCK))  # one token short of a window
    with pytest.raises(ShardError, match="fewer than block_size"):
        TokenBatches(data_dir, "train", 4, BLOCK)


def test_token_ids_beyond_vocab_size_are_refused_naming_the_file_and_the_id(tmp_path):
    tokens = np.arange(100) % 50
    tokens[73] = 300                                    # one id the model's vocabulary does not have
    path = str(tmp_path / "train_000000.bin")
    write_shard(path, tokens)
    assert len(TokenBatches(str(tmp_path), "train", 2, BLOCK, vocab_size=301).paths) == 1   # 300 < 301: fine
    with pytest.raises(ShardError, match=f"{path} holds token id 300, but vocab_size is 256"):
        TokenBatches(str(tmp_path), "train", 2, BLOCK, vocab_size=256)
    # a shard written before the header recorded the id range is scanned instead
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    assert header[3] == 301
    header[3] = 0
    with open(path, "r+b") as f:
        f.write(header.tobytes())
    with pytest.raises(ShardError, match="holds token id 300, but vocab_size is 256"):
        TokenBatches(str(tmp_path), "train", 2, BLOCK, vocab_size=256)


def test_stateful_skip_continues_where_drawing_the_skipped_batches_would(data_dir):
    drawn = TokenBatches(data_dir, "train", 4, BLOCK, seed=5, mode="stateful")
    skipped = TokenBatches(data_dir, "train", 4, BLOCK, seed=5, mode="stateful")
    for _ in range(3):
        drawn.get()
    skipped.skip(3)
    for _ in range(2):
        a, b = drawn.get(), skipped.get()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert drawn.state_dict() == skipped.state_dict()
    with pytest.raises(ValueError, match="stateless batches are addressed by step"):
        TokenBatches(data_dir, "train", 4, BLOCK).skip(1)


def test_iter_sequential_yields_consecutive_non_overlapping_windows_shard_by_shard(data_dir):
    w = BLOCK + 1
    expected = []
    for base, n in [(30000, 100), (40000, 40)]:  # explicit slicing of the known val contents
        for k in range(n // w):
            expected.append(np.arange(base + k * w, base + (k + 1) * w))
    got = list(iter_sequential(data_dir, "val", BLOCK))
    assert len(got) == len(expected) == 100 // w + 40 // w
    for (x, y), row in zip(got, expected):
        assert x.shape == y.shape == (BLOCK,) and x.dtype == torch.int64
        assert x.tolist() == row[:-1].tolist() and y.tolist() == row[1:].tolist()
    capped = list(iter_sequential(data_dir, "val", BLOCK, max_tokens=3 * BLOCK + 5))
    assert len(capped) == 3 and all(torch.equal(c[0], g[0]) for c, g in zip(capped, got))
    with pytest.raises(ShardError, match="block_size"):
        next(iter_sequential(data_dir, "val", 100))
