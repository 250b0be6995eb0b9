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


# (check_every, T, late): with late stop strings and a short lookback the
# host check copies a window of the buffer that starts past token 0.
@pytest.mark.parametrize(
    ("check_every", "T", "late"), [(3, 32, False), (16, 32, False), (2, 64, True)]
)
def test_stop_strings_end_the_completion_at_the_completing_token(
    model, h, tokenizer, check_every, T, late
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
        stop_check_every=check_every, **kw,
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
        np.testing.assert_array_equal(np.asarray(out.logp)[b, :n], np.asarray(free.logp)[b, :n])
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
