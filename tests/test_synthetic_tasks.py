"""The position study's task generators: every answer re-derived by an independent reading of
the sequence, no answer reachable without the task's mechanism, the same sequences for the same
seed and other ones for another seed."""
import numpy as np
import pytest

from training import synthetic_tasks as st

V = st.VOCAB
LENGTHS = (64, 128, 512)
SEEDS = range(20)


def is_symbol(t):
    return V.symbol_start <= t < V.symbol_start + V.n_symbols


def is_value(t):
    return V.value_start <= t < V.value_start + V.n_values


def is_filler(t):
    return V.filler_start <= t < V.filler_start + V.n_filler


# -- independent readings: what a person told the task's rules would answer at each position ----


def expected_recall(seq):
    """Pairs are read up to SEP; after it, every key is followed by the value it was paired with."""
    sep = list(seq).index(V.SEP)
    pairs = {}
    for i in range(1, sep, 2):
        assert is_symbol(seq[i]) and is_value(seq[i + 1])
        assert seq[i] not in pairs, "keys are distinct"
        pairs[seq[i]] = seq[i + 1]
    expected = {}
    i = sep + 1
    while i < len(seq) and seq[i] != V.PAD:
        assert seq[i] in pairs, "every query is a key of the context"
        expected[i + 1] = pairs[seq[i]]
        i += 2
    return expected


def expected_copy(seq):
    sep = list(seq).index(V.SEP)
    source = list(seq[1:sep])
    assert len(set(source)) == len(source) and all(is_symbol(t) for t in source)
    return {sep + 1 + j: t for j, t in enumerate(source)}


def expected_passkey(seq):
    s = list(seq)
    assert s.count(V.KEY) == 1 and s.count(V.QUERY) == 1
    key_at, query_at = s.index(V.KEY), s.index(V.QUERY)
    assert key_at < query_at
    key = s[key_at + 1:key_at + 1 + st.PASSKEY_TOKENS]
    assert all(is_value(t) for t in key)
    return {query_at + 1 + j: t for j, t in enumerate(key)}


def expected_lag(seq):
    expected = {}
    for p, t in enumerate(seq):
        if V.back(1) <= t <= V.back(V.max_lag):
            k = t - V.back(1) + 1
            assert is_symbol(seq[p - k]), "a query looks back onto a stream symbol"
            expected[p + 1] = seq[p - k]
    return expected


READERS = {"recall": expected_recall, "copy": expected_copy, "passkey": expected_passkey, "lag": expected_lag}


@pytest.mark.parametrize("task", st.TASKS)
def test_answers_equal_an_independent_reading_of_the_sequence(task):
    for length in LENGTHS:
        for seed in SEEDS:
            seq, answer = st.GENERATORS[task](length, np.random.default_rng(seed))
            assert seq.shape == answer.shape == (length + 1,)
            assert seq[0] == V.task_tokens[task] and not answer[0]
            expected = READERS[task](seq)
            assert sorted(expected) == np.flatnonzero(answer).tolist()
            assert all(seq[i] == t for i, t in expected.items())
            assert ((seq >= 0) & (seq < V.size)).all()


def test_task_sizes_grow_with_the_length_as_documented():
    seqs = {L: st.recall(L, np.random.default_rng(0))[0] for L in (64, 512)}
    pairs = {L: len(expected_recall(s)) for L, s in seqs.items()}
    assert pairs[512] > 7 * pairs[64]            # more queries (and pairs) in a longer sequence
    assert st.copy(512, np.random.default_rng(0))[1].sum() == 255
    assert st.passkey(512, np.random.default_rng(0))[1].sum() == st.PASSKEY_TOKENS
    lag_answers = st.lag(512, np.random.default_rng(0))[1].sum()
    assert 512 // st.LAG_GAP[1] <= lag_answers <= 512 // st.LAG_GAP[0] + 1


@pytest.mark.parametrize("task", st.TASKS)
def test_no_answer_is_the_current_input_or_a_marker(task):
    for seed in SEEDS:
        seq, answer = st.GENERATORS[task](128, np.random.default_rng(seed))
        for i in np.flatnonzero(answer):
            assert seq[i] != seq[i - 1]                  # predicting "repeat the input" never works
            assert is_symbol(seq[i]) or is_value(seq[i])  # answers are content, never a marker


@pytest.mark.parametrize("task", ["recall", "passkey", "lag"])
def test_no_fixed_offset_gives_the_answer(task):
    """The answer must be found by content or by the query's k, not by looking a fixed number of
    positions back: no offset predicts more than a third of the answers (copy is exempt: its
    source sits exactly n + 1 back by definition)."""
    hits, total = np.zeros(129), 0
    for seed in range(150):
        seq, answer = st.GENERATORS[task](128, np.random.default_rng(seed))
        for i in np.flatnonzero(answer):
            if task == "passkey" and seq[i - 1] != V.QUERY:
                continue     # the later key tokens follow the first by induction; the first is the retrieval
            total += 1
            query = i - 1                      # the position whose prediction is the answer
            for d in range(1, query + 1):
                hits[d] += seq[query - d] == seq[i]
    assert total > 100 and hits.max() / total < 1 / 3


def test_the_answer_appears_before_the_query_only_where_the_task_put_it():
    for seed in SEEDS:
        seq, _ = st.passkey(256, np.random.default_rng(seed))
        key_at, query_at = list(seq).index(V.KEY), list(seq).index(V.QUERY)
        values_before_query = [i for i in range(query_at) if is_value(seq[i])]
        assert values_before_query == list(range(key_at + 1, key_at + 1 + st.PASSKEY_TOKENS))
        assert all(is_filler(seq[i]) for i in range(1, query_at) if not key_at <= i <= key_at + st.PASSKEY_TOKENS)
        seq, _ = st.copy(256, np.random.default_rng(seed))
        sep = list(seq).index(V.SEP)
        for j, t in enumerate(seq[sep + 1:], start=sep + 1):
            if t != V.PAD:   # each copied symbol occurs once in the source and nowhere else before it
                assert list(seq[:j]).count(t) == 1


@pytest.mark.parametrize("task", st.TASKS)
def test_same_seed_same_sequences_other_seed_other_sequences(task):
    a = st.GENERATORS[task](128, np.random.default_rng(3))
    b = st.GENERATORS[task](128, np.random.default_rng(3))
    c = st.GENERATORS[task](128, np.random.default_rng(4))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_batches_mark_only_answers_and_depend_on_the_seed_only():
    tasks = ["recall", "copy", "passkey", "lag"] * 2
    x1, y1 = st.batch(tasks, 64, st.training_rng(5))
    x2, y2 = st.batch(tasks, 64, st.training_rng(5))
    x3, _ = st.batch(tasks, 64, st.training_rng(6))
    assert x1.shape == y1.shape == (8, 64)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and not np.array_equal(x1, x3)
    rng = st.training_rng(5)
    for row, task in enumerate(tasks):
        seq, answer = st.GENERATORS[task](64, rng)
        assert np.array_equal(x1[row], seq[:-1])
        assert np.array_equal(y1[row], np.where(answer[1:], seq[1:], -1))


def test_evaluation_sets_are_fixed_and_apart_from_training_data():
    a = st.evaluation_set("copy", 128, 4, eval_seed=1)
    b = st.evaluation_set("copy", 128, 4, eval_seed=1)
    assert np.array_equal(a[0], b[0])
    assert not np.array_equal(st.evaluation_set("copy", 128, 4, eval_seed=2)[0], a[0])
    train_x, _ = st.batch(["copy"] * 4, 128, st.training_rng(1))
    assert not any(np.array_equal(r, e) for r in train_x for e in a[0])


def test_a_length_a_task_cannot_hold_is_one_clear_error():
    with pytest.raises(st.TaskError, match="copy at length 1024 needs 511 distinct symbols"):
        st.check_tasks(["copy"], [64, 1024])
    with pytest.raises(st.TaskError, match="unknown task 'sort'"):
        st.check_tasks(["sort"], [64])
