"""Stop strings, checked for every row in one tokenizer call per round: the same cuts as decoding each row's
whole text, whichever way the tokens arrive (one at a time or several per round), ASCII or not."""
import random

import pytest
from transformers import AutoTokenizer

from adaspec_worker.rows import RowCodec
from tests.helpers import TINY


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TINY))


def first_cut(tok, toks, stops):
    """The reference: the shortest prefix whose whole decoded text holds a stop string."""
    for k in range(1, len(toks) + 1):
        if any(s in tok.decode(toks[:k], skip_special_tokens=True) for s in stops):
            return k
    return None


@pytest.mark.parametrize("stops", [["\ndef ", "\nclass "], ["return"], ["é ü", "→"]])
def test_batched_stop_check_finds_the_first_cut(tok, stops):
    rng = random.Random(0)
    texts = ["def f(x):\n    return x\n\ndef g():\n    pass\n", "class A:\n    x = 'é ü' → 3\nclass B: pass",
             "print('hello')\n# no stop here at all, just words and more words"]
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts] * 3
    stop = RowCodec(tok, stops, 64, 2048).stop_fn()
    for rows in (list(range(len(seqs))), [0], [4, 2]):
        got, sofar, done = {}, {i: [] for i in rows}, set()
        while len(done) < len(rows):
            live = [i for i in rows if i not in done]
            new = []
            for i in live:  # 1 to 4 tokens arrive per round, as a speculative round delivers them
                n = rng.randint(1, 4)
                sofar[i] += seqs[i][len(sofar[i]): len(sofar[i]) + n]
                new.append(n)
            cuts = stop.batch(live, [sofar[i] for i in live], new)
            for i, cut in zip(live, cuts):
                if cut is not None or len(sofar[i]) == len(seqs[i]):
                    got[i], _ = cut, done.add(i)
        for i in rows:
            assert got[i] == first_cut(tok, seqs[i], stops), (stops, i)
