"""Stop strings, checked for every row in one tokenizer call (`Outputs`: every few tokens of a row): the same
cuts as decoding each row's whole text, whichever way the tokens arrive (one at a time or several per round), ASCII
or not."""
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


@pytest.mark.parametrize("every", [1, 4, 7])
def test_outputs_cut_at_the_first_stop_string_however_seldom_they_look(tok, every, monkeypatch):
    """`Outputs` looks for stop strings once a row has `STOP_EVERY` unseen tokens (or when it ends otherwise, EOS
    included): each row still ends where its stop string first appears, with reason "stop", or at EOS / length
    when none appears; the check is shown to matter (without a stop rule the rows run on)."""
    from adaspec_worker.decode.batch import Outputs, Request
    from adaspec_worker.decode.sampling import SamplingParams
    from adaspec_worker.decode.stats import RowOutcome

    monkeypatch.setattr(Outputs, "STOP_EVERY", every)
    stops = ["\ndef ", "\nclass "]
    eos = tok.convert_tokens_to_ids(tok.tokenize(" @"))[0]  # a stand-in EOS inside the texts
    texts = ["def f(x):\n    return x\n\ndef g():\n    pass\n", "x = 1\ny = 2\nclass A: pass\n",
             "print('hi')\n# nothing to stop at", "a = 1\ndef b(): @ more text\ndef c", "q = 2 @ tail"]
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    rng = random.Random(every)
    for stop_fn in (RowCodec(tok, stops, 64, 2048).stop_fn(), None):
        outputs = Outputs()
        sp = SamplingParams(max_new_tokens=40, temperature=0.0, eos_token_ids=(eos,))
        for i in range(len(seqs)):
            outputs.add(i, Request([1], sp, stop_fn=stop_fn, tag=i))
        got, at = {}, [0] * len(seqs)
        while outputs.live:
            origin = sorted(outputs.rows)
            outcomes = []
            for i in origin:  # 1 to 4 tokens per round (pad past each text's end)
                n = rng.randint(1, 4)
                toks = (seqs[i] + [seqs[i][0]] * 64)[at[i]: at[i] + n]
                at[i] += n
                outcomes.append(RowOutcome(n - 1, n - 1, n - 1, toks, None))
            for e in outputs.record(origin, outcomes):
                got[e.row] = (e.completion.tokens, e.completion.finish_reason)
        for i, s in enumerate(seqs):
            padded = (s + [s[0]] * 64)[:40]
            cut = first_cut(tok, padded, stops) if stop_fn else None
            end = padded.index(eos) + 1 if eos in padded else None
            if cut is not None and (end is None or cut <= end):
                assert got[i] == (padded[:cut], "stop"), (every, i)
            elif end is not None:
                assert got[i] == (padded[:end], "stop"), (every, i)
            else:
                assert got[i] == (padded, "length"), (every, i)
        if stop_fn is None:
            assert got[0][1] == "length" and len(got[0][0]) == 40
        else:  # every case met: a stop string, a stop string before EOS, EOS alone, neither
            assert [got[i][1] for i in range(len(seqs))] == ["stop", "stop", "length", "stop", "stop"]
            assert got[3][0][-1] != eos and got[4][0][-1] == eos
