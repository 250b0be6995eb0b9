"""Stop strings: the completion ends at the token that completes the first occurrence."""

from __future__ import annotations

import numpy as np
import pytest

from erpo_jax.sampling import sample

T = 32


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    from erpo_jax.tasks import build_countdown_tokenizer

    path = build_countdown_tokenizer(tmp_path_factory.mktemp("tok"))
    return tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))


def _expected_cut(tokenizer, row, stops):
    """Index of the first token after which the decoded completion contains a stop string."""
    for j in range(len(row)):
        text = tokenizer.decode([int(i) for i in row[: j + 1]])
        if any(s in text for s in stops):
            return j
    return None


# (check_every, T, late, phases): with late stop strings and a short lookback
# the host check copies a window of the buffer that starts past token 0; with
# decode phases the checks' chunks straddle the phases' ends (3-step chunks,
# phases of 7-8 steps) or hold several (16-step chunks, phases of 4 steps).
@pytest.mark.parametrize(
    ("check_every", "T", "late", "phases"),
    [(3, 32, False, 1), (16, 32, False, 1), (2, 64, True, 1), (3, 32, False, 4),
     (16, 32, False, 8)],
)  # fmt: skip
def test_stop_strings_end_the_completion_at_the_completing_token(
    model, h, tokenizer, check_every, T, late, phases
):
    prompt, prompt_mask = h.left_padded(8)
    kw = dict(max_new_tokens=T, eos_ids=())
    free = sample(model, prompt, prompt_mask, h.key(8), **kw)
    free_tokens = np.asarray(free.tokens)
    # Stop strings taken from what the model writes: 2-3 characters of rows 0 and 1
    # (spanning token boundaries), and one string it never writes.
    text0 = tokenizer.decode([int(i) for i in free_tokens[0]])
    text1 = tokenizer.decode([int(i) for i in free_tokens[1]])
    stops = [text0[9:12], text1[20:22], "\x7f never written"]
    if late:  # found after the first window (lookback 2 + 16 tokens, width 20)
        stops = [text0[-6:-2], text1[-5:-1], "\x7f"]
    out = sample(
        model, prompt, prompt_mask, h.key(8), stop_strings=stops, tokenizer=tokenizer,
        stop_check_every=check_every, decode_phases=phases, **kw,
    )  # fmt: skip
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    cuts = [_expected_cut(tokenizer, free_tokens[b], stops) for b in range(4)]
    assert cuts[0] is not None and cuts[1] is not None
    if late:
        assert max(cuts[0], cuts[1]) >= 24, cuts  # found only in a later window
    for b, cut in enumerate(cuts):
        n = T if cut is None else cut + 1
        assert int(out.lengths[b]) == n
        np.testing.assert_array_equal(mask[b], np.arange(T) < n)
        # Same key: identical draws up to the stop, padding after it.
        np.testing.assert_array_equal(tokens[b, :n], free_tokens[b, :n])
        assert (tokens[b, n:] == 0).all()
        # Bit for bit with one loop; decode phases attend over caches of other
        # sizes (float rounding).
        np.testing.assert_allclose(np.asarray(out.logp)[b, :n], np.asarray(free.logp)[b, :n],
                                   rtol=0, atol=0 if phases == 1 else 1e-6)  # fmt: skip
        assert (np.asarray(out.entropy)[b, n:] == 0).all()
        if cut is not None:
            assert any(s in tokenizer.decode([int(i) for i in tokens[b, :n]]) for s in stops)
            assert not any(
                s in tokenizer.decode([int(i) for i in tokens[b, : n - 1]]) for s in stops
            )


def test_stop_strings_and_eos_together(model, h, tokenizer):
    """A row that hits EOS first keeps its EOS end; the stop string is not searched past it."""
    prompt, prompt_mask = h.left_padded(9)
    eos = tuple(range(4, 30))
    free = sample(model, prompt, prompt_mask, h.key(9), max_new_tokens=T, eos_ids=eos)
    out = sample(model, prompt, prompt_mask, h.key(9), max_new_tokens=T, eos_ids=eos,
                 stop_strings=["0"], tokenizer=tokenizer, stop_check_every=4)  # fmt: skip
    for b in range(4):
        n = int(free.lengths[b])
        row = np.asarray(free.tokens)[b, :n]
        cut = _expected_cut(tokenizer, row, ["0"])
        assert int(out.lengths[b]) == (n if cut is None else cut + 1)


def test_matcher_refuses_a_window_that_misses_tokens_it_must_read():
    from erpo_jax.sampling._stop import StopStringMatcher

    class Chars:
        def decode(self, ids):
            return "".join(chr(97 + i) for i in ids)

    m = StopStringMatcher(["zz"], Chars(), 1)  # lookback 2 + 16 = 18
    row = np.arange(20)[None] % 20  # "abc...t": no stop string
    assert not m.update(row, np.array([20])).any()  # checked to 20
    window = np.arange(30)[None, 10:] % 20  # tokens 10..29: starts after 20 - 18 = 2
    with pytest.raises(
        ValueError, match=r"row 0 needs tokens 2\.\.29, outside the window 10\.\.29"
    ):
        m.update(window, np.array([30]), offset=10)
    hit = m.update(np.concatenate([row, [[25, 25]]], axis=1)[:, 2:], np.array([22]), offset=2)
    assert hit.tolist() == [True] and m.cut.tolist() == [21]  # "zz" completed by token 21


def test_stop_string_chunks_run_the_decode_phases_in_order_on_a_growing_cache(
    model, h, tokenizer, monkeypatch
):
    """decode_phases with stop strings: each chunk between host checks runs the
    phases it overlaps, in order, each on the cache its own steps can fill."""
    from erpo_jax.sampling import _sampler

    calls = []
    original = _sampler._decode_jit

    def spy(graphdef, params, state, keys, stop_at, dyn, *, static):
        calls.append((static.phase, int(stop_at), state.cache.max_length))
        return original(graphdef, params, state, keys, stop_at, dyn, static=static)

    monkeypatch.setattr(_sampler, "_decode_jit", spy)
    prompt, prompt_mask = h.left_padded(8)
    sample(model, prompt, prompt_mask, h.key(8), max_new_tokens=T, eos_ids=(),
           stop_strings=("\x7f never written",), tokenizer=tokenizer, stop_check_every=5,
           decode_phases=3)  # fmt: skip
    # Steps 1..31 in 3 phases ending before steps 12, 22 and 32; chunks of
    # 5 steps from step 1 stop at 6, 11, 16, ...: the chunk to 16 runs phase
    # 0 (to step 12), then phase 1, and the chunk to 26 phases 1 and 2.
    assert [c[:2] for c in calls] == [
        (0, 6), (0, 11), (0, 16), (1, 16), (1, 21), (1, 26), (2, 26), (2, 31), (2, 32)
    ]  # fmt: skip
    # Each call gets the cache as the phase before it left it: the prefill's
    # (phase 0's), grown on entry to phases 1 and 2 (S + 11, S + 21, S + 31).
    s = calls[0][2] - 11
    assert [c[2] for c in calls] == [s + 11] * 4 + [s + 21] * 3 + [s + 31] * 2


def _spy_decode(monkeypatch):
    """Records ``(stop_at, state.step on return)`` of every call of the jitted decode
    loop. ``step`` is the next completion index to fill: the prefill writes token
    0, and each decode step one more, so a run made ``step - 1`` decode steps."""
    from erpo_jax.sampling import _sampler

    calls = []
    original = _sampler._decode_jit

    def spy(graphdef, params, state, keys, stop_at, dyn, *, static):
        out = original(graphdef, params, state, keys, stop_at, dyn, static=static)
        calls.append((int(stop_at), int(out.step)))
        return out

    monkeypatch.setattr(_sampler, "_decode_jit", spy)
    return calls


def test_stop_strings_that_fire_early_end_the_loop_at_the_next_check(
    model, h, tokenizer, monkeypatch
):
    """Every row hits a stop string within its first few tokens: the host loop
    decodes chunk by chunk only until the check that sees the last row's cut,
    not to T. Stop strings mark rows done only at a check, so the last chunk
    runs in full: the loop ends at the first check step ``1 + n * k`` (the
    prefill wrote token 0; checks follow every ``k`` steps) past the last
    cut, ``min(T, 1 + ceil(max_cut / k) * k)``."""
    k = 4
    prompt, prompt_mask = h.left_padded(8)
    kw = dict(max_new_tokens=T, eos_ids=())
    free = np.asarray(sample(model, prompt, prompt_mask, h.key(8), **kw).tokens)
    texts = [tokenizer.decode([int(i) for i in row]) for row in free]
    # Two characters from early in each row's own text: every row stops early.
    stops = [text[i : i + 2] for text, i in zip(texts, (3, 6, 1, 8), strict=True)]
    cuts = [_expected_cut(tokenizer, row, stops) for row in free]
    assert None not in cuts and max(cuts) < 12, (stops, cuts)
    calls = _spy_decode(monkeypatch)
    out = sample(model, prompt, prompt_mask, h.key(8), stop_strings=stops, tokenizer=tokenizer,
                 stop_check_every=k, decode_phases=1, **kw)  # fmt: skip
    assert np.asarray(out.lengths).tolist() == [c + 1 for c in cuts]
    end = min(T, 1 + -(-max(cuts) // k) * k)
    assert end < T
    # One call per chunk of k steps (1 -> 5 -> 9 ...), each running in full,
    # and none after the check that found the last row done.
    chunks = list(range(1 + k, end + 1, k))
    assert calls == [(stop, stop) for stop in chunks], (cuts, calls)


@pytest.mark.parametrize(
    ("stop_strings", "phases"),
    [(None, 1), (("\x7f never written",), 1), (("\x7f never written",), 3)],
)
def test_eos_in_every_row_ends_the_loop_at_the_longest_row(
    model, h, tokenizer, monkeypatch, stop_strings, phases
):
    """Rows that end at EOS are done inside the jitted loop, so the loop stops
    at the step that writes the longest row's EOS: not at T (one call, no stop
    strings), not at the end of its decode phase, and not at the end of the
    stop-string check's chunk it falls in (the chunk's loop stops mid-chunk
    and the check after it ends the host loop)."""
    k = 8
    prompt, prompt_mask = h.left_padded(8)
    free = np.asarray(sample(model, prompt, prompt_mask, h.key(8), max_new_tokens=T,
                             eos_ids=()).tokens)  # fmt: skip
    # EOS ids taken from each row's own draws, so that every row ends early;
    # a row ends at the first of them it draws (counting the EOS token).
    eos = tuple(sorted({int(free[b, j]) for b, j in zip(range(4), (5, 3, 9, 11), strict=True)}))
    lengths = [int(np.flatnonzero(np.isin(row, eos))[0]) + 1 for row in free]
    longest = max(lengths)
    assert longest < T - 1 and (longest - 1) % k, (eos, lengths)  # mid-chunk, mid-cache
    calls = _spy_decode(monkeypatch)
    out = sample(model, prompt, prompt_mask, h.key(8), max_new_tokens=T, eos_ids=eos,
                 stop_strings=stop_strings, tokenizer=tokenizer, stop_check_every=k,
                 decode_phases=phases)  # fmt: skip
    assert np.asarray(out.lengths).tolist() == lengths
    # Every loop stops at the longest row's EOS (or sooner, at its stop or
    # phase end), and the last one at exactly that step.
    assert all(step <= min(stop, longest) for stop, step in calls), calls
    assert calls[-1][1] == longest, calls
    if stop_strings is None:
        # One loop over all steps (every phase in one call), stopped early.
        assert [c[0] for c in calls] == [T]
    else:
        # Chunks 1 -> 9 -> 17 ..., each phase a chunk overlaps a call of its
        # own, up to the chunk holding the longest row's end and none after.
        chunks = list(range(1 + k, min(T, 1 + -(-(longest - 1) // k) * k) + 1, k))
        assert sorted({c[0] for c in calls}) == chunks, calls
        assert chunks[-1] > longest
        if phases == 1:
            assert calls == [(stop, min(stop, longest)) for stop in chunks]
