"""The prompt pipeline: source loading, and the grain stream's order, shards and state."""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings

import pytest

from erpo_jax.tasks import CountdownProblem, MalformedRowWarning, MathProblem, generate_countdown
from erpo_jax.train._data import PROMPT_SOURCE_KINDS, PromptStream, load_prompt_source


@dataclasses.dataclass(frozen=True)
class Item:
    """A stand-in problem: a frozen dataclass, like the real ones, that grain must not stack."""

    id: int


def items(n: int) -> tuple[Item, ...]:
    return tuple(Item(i) for i in range(n))


def ids(batches: list[list[Item]]) -> list[int]:
    """The item ids of consecutive batches, flattened in order."""
    return [item.id for batch in batches for item in batch]


def take(stream: PromptStream, n: int) -> list[list[Item]]:
    return [stream.next_batch() for _ in range(n)]


def make(source=None, **kw) -> PromptStream:
    kw = {"batch_size": 4, "seed": 0, "shard_index": 0, "shard_count": 1, **kw}
    return PromptStream(items(24) if source is None else source, **kw)


# ---------------------------------------------------------------- order


def test_batches_are_lists_of_source_items_not_arrays():
    batch = make().next_batch()
    assert type(batch) is list and len(batch) == 4
    assert all(type(item) is Item for item in batch)


def test_same_seed_gives_same_stream():
    assert ids(take(make(seed=7), 15)) == ids(take(make(seed=7), 15))


def test_different_seeds_give_different_streams():
    assert ids(take(make(seed=0), 6)) != ids(take(make(seed=1), 6))


def test_neighbouring_seeds_do_not_share_shifted_epochs():
    # grain reseeds epoch e with seed + e; the run seed is hashed first, so
    # seed 1's first epoch is not seed 0's second epoch.
    epoch1_of_seed0 = ids(take(make(seed=0), 12))[24:]
    epoch0_of_seed1 = ids(take(make(seed=1), 6))
    assert epoch1_of_seed0 != epoch0_of_seed1


def test_each_epoch_is_a_new_permutation_of_the_source():
    stream = make(seed=3)
    epochs = [ids(take(stream, 6)) for _ in range(3)]  # 6 batches of 4 = 24 items = one epoch
    for epoch in epochs:
        assert sorted(epoch) == list(range(24))  # nothing missing, nothing twice
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    assert epochs[0] != list(range(24))  # shuffled at all
    assert stream.epoch == 3 and stream.batches == 18


def test_batches_run_across_epoch_boundaries_without_dropping_items():
    # 10 items, batches of 4: batch 3 holds the last 2 items of epoch 0 and the first 2 of epoch 1.
    stream = make(items(10), seed=5)
    flat = ids(take(stream, 5))  # 20 items = exactly two epochs
    assert sorted(flat[:10]) == list(range(10))
    assert sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]
    assert stream.epoch == 2


def test_epoch_counts_completed_passes():
    stream = make(items(10))
    counts = []
    for _ in range(8):
        stream.next_batch()
        counts.append(stream.epoch)
    assert counts == [0, 0, 1, 1, 2, 2, 2, 3]  # after 4, 8, ..., 32 items of 10


def test_no_shuffle_keeps_source_order_and_repeats():
    stream = make(items(6), batch_size=4, shuffle=False)
    assert ids(take(stream, 3)) == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]


def test_stream_is_an_iterator():
    stream = make(seed=2)
    assert iter(stream) is stream
    reference = ids(take(make(seed=2), 3))
    assert ids([next(stream) for _ in range(3)]) == reference
    assert stream.batches == 3


# ---------------------------------------------------------------- state


@pytest.mark.parametrize("k", [0, 2, 5, 7])  # 6 batches per epoch: 7 restores past a boundary
def test_restore_continues_the_uninterrupted_stream(k):
    uninterrupted = make(seed=11)
    expected = ids(take(uninterrupted, k + 5))[4 * k :]

    first = make(seed=11)
    take(first, k)
    state = first.state()
    resumed = make(seed=11)
    resumed.restore(state)
    assert ids(take(resumed, 5)) == expected
    assert resumed.batches == k + 5


def test_state_round_trips_through_json_and_records_progress():
    stream = make(items(10), seed=4)
    take(stream, 3)  # 12 items of 10
    state = stream.state()
    assert json.loads(json.dumps(state)) == state
    assert state["batches"] == 3 and state["epoch"] == 1
    assert state["seed"] == 4 and state["batch_size"] == 4 and state["source_size"] == 10

    resumed = make(items(10), seed=4)
    resumed.restore(json.loads(json.dumps(state)))
    assert resumed.epoch == 1
    assert ids(take(resumed, 4)) == ids(take(stream, 4))


def test_restore_across_a_non_divisible_epoch_boundary():
    stream = make(items(10), seed=9)
    take(stream, 2)  # 8 of 10 items: the next batch straddles epochs 0 and 1
    resumed = make(items(10), seed=9)
    resumed.restore(stream.state())
    assert ids(take(resumed, 5)) == ids(take(stream, 5))


@pytest.mark.parametrize(
    ("key", "changed"),
    [("seed", {"seed": 1}), ("batch_size", {"batch_size": 3}), ("shuffle", {"shuffle": False})],
)
def test_restore_rejects_a_state_of_other_settings(key, changed):
    state = make().state()
    with pytest.raises(ValueError, match=f"{key}="):
        make(**changed).restore(state)


def test_restore_rejects_a_source_of_another_size():
    with pytest.raises(ValueError, match="source_size=24"):
        make(items(20)).restore(make().state())


def test_restore_rejects_a_foreign_state():
    with pytest.raises(ValueError, match=r"not a 'erpo_jax\.PromptStream/1' state"):
        make().restore({"next_index": 3})


# ---------------------------------------------------------------- shards


def test_two_shards_are_disjoint_and_cover_the_source_each_epoch():
    shards = [make(batch_size=3, seed=6, shard_index=i, shard_count=2) for i in range(2)]
    for _ in range(3):  # 24 items / (2 shards * 3) = 4 steps per epoch
        epoch: list[int] = []
        for _ in range(4):
            a, b = (set(ids([s.next_batch()])) for s in shards)
            assert not a & b  # no prompt on both processes in one step
            epoch += [*a, *b]
        assert sorted(epoch) == list(range(24))
    assert shards[0].state() == shards[1].state()  # process 0's saved copy restores every process


def test_shards_together_draw_the_single_process_global_batch():
    # So a run sees the same prompts whatever its number of hosts.
    single = make(batch_size=6, seed=6)
    shards = [make(batch_size=3, seed=6, shard_index=i, shard_count=2) for i in range(2)]
    for _ in range(10):
        together = ids([shards[0].next_batch(), shards[1].next_batch()])
        assert sorted(together) == sorted(ids([single.next_batch()]))


def test_shard_defaults_to_the_jax_process():
    import jax

    stream = PromptStream(items(8), batch_size=2, seed=0)
    assert (stream.shard_index, stream.shard_count) == (jax.process_index(), jax.process_count())


# ---------------------------------------------------------------- sources


def test_countdown_source_is_the_seeded_generator_and_streams_problems():
    problems = load_prompt_source("countdown", num_problems=12, seed=3, level="easy")
    assert problems == tuple(generate_countdown(12, seed=3, split="train", level="easy"))
    test_split = load_prompt_source("countdown", num_problems=12, seed=3, split="test")
    assert not {p.key for p in problems} & {p.key for p in test_split}
    batch = PromptStream(problems, batch_size=4, seed=0, shard_index=0, shard_count=1).next_batch()
    assert len(batch) == 4 and all(isinstance(p, CountdownProblem) for p in batch)
    assert set(batch) <= set(problems)


def write_jsonl(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) for i in range(4)]
    rows.insert(2, '{"problem": "broken row", "answer": ')  # line 3: bad JSON
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("kind", ["jsonl", "file"])
def test_jsonl_source_skips_the_malformed_row_with_a_warning(tmp_path, kind):
    path = write_jsonl(tmp_path)
    with pytest.warns(MalformedRowWarning, match=r"prompts\.jsonl: skipped 1 of 5") as record:
        problems = load_prompt_source(kind, path=str(path))
    assert f"{path}:3: bad JSON" in str(record[0].message)
    assert all(isinstance(p, MathProblem) for p in problems)
    assert [p.answer for p in problems] == ["0", "2", "4", "6"]
    stream = PromptStream(problems, batch_size=2, seed=1, shard_index=0, shard_count=1)
    epoch = [p.answer for batch in take(stream, 2) for p in batch]
    assert sorted(epoch) == ["0", "2", "4", "6"]


def test_num_problems_caps_a_file_source(tmp_path):
    from erpo_jax.train._data import CappedSourceWarning

    path = str(write_jsonl(tmp_path))
    with (
        pytest.warns(MalformedRowWarning),
        pytest.warns(CappedSourceWarning, match=r"keeps the first 3 of the \d+ problems"),
    ):
        problems = load_prompt_source("file", path=path, num_problems=3)
    assert [p.answer for p in problems] == ["0", "2", "4"]
    # no cap, or a cap above the row count: every row, and no warning about it
    with warnings.catch_warnings():
        warnings.simplefilter("error", CappedSourceWarning)
        warnings.simplefilter("ignore", MalformedRowWarning)
        everything = load_prompt_source("file", path=path, num_problems=None)
        assert load_prompt_source("file", path=path, num_problems=1000) == everything
    assert len(everything) > 3


def test_unknown_kind_lists_the_allowed_kinds():
    with pytest.raises(ValueError, match="kind='csv'") as err:
        load_prompt_source("csv", path="x.csv")
    for kind in PROMPT_SOURCE_KINDS:
        assert repr(kind) in str(err.value)


def test_file_source_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="needs path="):
        load_prompt_source("file")
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(FileNotFoundError, match=r"path='.*nowhere\.jsonl' does not exist"):
        load_prompt_source("jsonl", path=str(missing))
    with pytest.raises(ValueError, match=r"kind='parquet' expects a \.parquet file"):
        load_prompt_source("parquet", path=str(write_jsonl(tmp_path)))


def test_empty_source_says_so(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "no answer"}\n')
    with pytest.warns(MalformedRowWarning), pytest.raises(ValueError, match="is empty"):
        load_prompt_source("file", path=str(path))


def test_countdown_needs_num_problems():
    with pytest.raises(ValueError, match="num_problems="):
        load_prompt_source("countdown")
    with pytest.raises(ValueError, match="num_problems must be None or an int >= 1"):
        load_prompt_source("countdown", num_problems=0)


@pytest.mark.parametrize("kind", ["hf", "tfds"])
def test_dataset_kinds_need_a_name(kind):
    with pytest.raises(ValueError, match="needs name="):
        load_prompt_source(kind)


@pytest.mark.parametrize(("kind", "module"), [("hf", "datasets"), ("tfds", "tensorflow_datasets")])
def test_missing_optional_library_names_the_extra(monkeypatch, kind, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ImportError, match=rf"pip install 'erpo_jax\[{kind}\]'"):
        load_prompt_source(kind, name="some/dataset")


# ---------------------------------------------------------------- stream arguments


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"batch_size": 0}, r"batch_size must be in 1\.\.24"),
        ({"batch_size": 25}, r"batch_size must be in 1\.\.24"),
        ({"batch_size": 13, "shard_index": 1, "shard_count": 2}, r"batch_size must be in 1\.\.12"),
        ({"shard_count": 25}, r"shard_count=25 leaves shards empty.*1\.\.24"),
        ({"shard_index": 2, "shard_count": 2}, r"shard_index must be in 0\.\.1"),
        ({"shard_index": 0, "shard_count": 0}, "shard_count must be an int >= 1"),
        ({"shard_index": None, "shard_count": 2}, "give both shard_index and shard_count"),
    ],
)
def test_bad_stream_arguments_name_the_argument(kw, message):
    with pytest.raises(ValueError, match=message):
        make(**kw)


def test_empty_source_stream_is_an_error():
    with pytest.raises(ValueError, match="source is empty"):
        make(())


def test_long_prompts_are_replaced_from_the_stream_and_counted(tmp_path):
    """The trainer skips prompts over rollout.max_prompt_tokens, warns, counts them,
    and fills the batch with the next prompts of the stream."""
    from types import SimpleNamespace

    from erpo_jax.models import load_tokenizer
    from erpo_jax.rollout import LongPromptWarning
    from erpo_jax.tasks import build_countdown_tokenizer, make_task
    from erpo_jax.train._loop import _next_prompts

    tokenizer = load_tokenizer(build_countdown_tokenizer(tmp_path))
    task = make_task("countdown")
    short = [CountdownProblem((1, 2), 3 + i) for i in range(6)]
    long = CountdownProblem(tuple(range(10, 30)), 999)
    length = {p: len(tokenizer(task.prompt(p, tokenizer))["input_ids"]) for p in (short[0], long)}
    assert length[long] > length[short[0]] + 5
    budget = length[short[0]] + 2  # every short prompt fits (targets 3..8: same length)
    # batches of 2: [s0, L], [s1, L], [s2, s3], ...
    rows = [short[0], long, short[1], long, short[2], short[3], short[4], short[5]]
    stream = PromptStream(rows, batch_size=2, seed=0, shuffle=False)
    run = SimpleNamespace(stream=stream, task=task, tokenizer=tokenizer, prompt_budget=budget)
    with pytest.warns(LongPromptWarning, match=r"skipped 2 prompt\(s\) longer than"):
        problems, skipped = _next_prompts(run, 2)
    assert problems == [short[0], short[1]] and skipped == 2
    problems, skipped = _next_prompts(run, 2)
    assert problems == [short[2], short[3]] and skipped == 0
    # nothing fits: a clear error naming the key, not an endless loop
    run = SimpleNamespace(
        stream=PromptStream([long] * 4, batch_size=2, seed=0, shuffle=False),
        task=task,
        tokenizer=tokenizer,
        prompt_budget=budget,
    )
    with pytest.raises(ValueError, match=r"gave only 0 of the 2 prompts .*max_prompt_tokens"):
        _next_prompts(run, 2)


def test_long_prompt_refills_keep_the_processes_streams_in_lockstep(tmp_path, monkeypatch):
    """With several processes every one draws as many batches as the process
    that skipped the most, so the stream state a checkpoint saves once holds
    for all of them; a peer that never fills makes every process raise."""
    from types import SimpleNamespace

    from erpo_jax.models import load_tokenizer
    from erpo_jax.sampling import _hosts
    from erpo_jax.tasks import build_countdown_tokenizer, make_task
    from erpo_jax.train import _loop

    tokenizer = load_tokenizer(build_countdown_tokenizer(tmp_path))
    task = make_task("countdown")
    rows = [CountdownProblem((1, 2), 3 + i) for i in range(8)]

    def local_run():
        stream = PromptStream(rows, batch_size=2, seed=0, shuffle=False)
        return SimpleNamespace(stream=stream, task=task, tokenizer=tokenizer, prompt_budget=10_000)

    # The emulated peer fits 0 prompts in its first batch and 2 in its second;
    # global_max(-count) is -(the smallest count over the processes).
    peer = iter([0, 2])
    monkeypatch.setattr(_hosts, "global_max", lambda v: max(v, -next(peer)))
    run = local_run()
    problems, skipped = _loop._next_prompts(run, 2)
    assert run.stream.batches == 2  # one batch more than this process alone needed
    assert problems == rows[:2] and skipped == 0

    monkeypatch.setattr(_hosts, "global_max", lambda v: max(v, 0))  # the peer never fills
    run = local_run()
    with pytest.raises(ValueError, match=r"32 batches of prompts gave only 0 of the 2 prompts"):
        _loop._next_prompts(run, 2)
    assert run.stream.batches == _loop._MAX_REFILLS
