"""Scorers and prompt builders of the evaluation tasks against scripted mock models with known
behaviour and hand-computed numbers (no model weights involved, no network)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from diffattn.eval import attention_noise as AN
from diffattn.eval import hallucination as H
from diffattn.eval import icl as I
from diffattn.eval import needle as N
from diffattn.eval.adapter import LayerMaps
from diffattn.eval.outliers import AbsStats
from diffattn.eval.quant import absmax_quantize
from diffattn.eval.tokenizer import TextTokenizer
from helpers import (SENTENCES, ScriptedAdapter, needle_answers, train_tokenizer, write_docs,
                             write_grounded_jsonl, write_icl_jsonl)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return TextTokenizer.from_file(train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


@pytest.fixture(scope="module")
def gen(tok):
    return N.NeedleGenerator(tok, [" ".join(SENTENCES[i:] + SENTENCES[:i]) for i in range(len(SENTENCES))])


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return write_docs(tmp_path_factory.mktemp("docs"))


# ------------------------------------------------------------------------------------- needle prompts

def _filler_before(p: N.NeedlePrompt, needle: N.Needle) -> int:
    """Haystack tokens before ``needle``: everything before it that is not BOS/intro/another needle."""
    before = needle.start - p.spans["intro"][1]
    return before - sum(nd.end - nd.start for nd in p.needles if nd.start < needle.start)


@pytest.mark.parametrize("length,depth,n,r", [(300, 0, 1, 1), (300, 100, 4, 2), (420, 50, 6, 2), (360, 25, 3, 3),
                                              (500, 75, 2, 1), (333, 37.5, 5, 2)])
def test_needle_prompt_properties(tok, gen, length, depth, n, r):
    prompts = gen.trial(length, depth, n, r, 7)
    assert len(prompts) == r
    assert sum(p.answer.pinned for p in prompts) == 1
    assert len({p.answer.city for p in prompts}) == r  # R different questions
    for p in prompts:
        assert len(p.ids) == length  # exact (well within the ±2% required)
        assert len(p.needles) == n
        others = [nd for nd in p.needles if nd is not p.answer]
        assert len(others) == n - 1
        assert len({nd.city for nd in p.needles}) == n  # N−1 distinct distractors, none the answer's city
        numbers = [str(nd.number) for nd in p.needles]
        assert len(set(numbers)) == n and all(a not in b for a in numbers for b in numbers if a != b)
        for nd in p.needles:  # each span is exactly the needle sentence
            assert tok.decode(p.ids[nd.start:nd.end]).strip() == f"The special magic {nd.city} number is: {nd.number}"
            assert tok.decode(p.ids[nd.number_start:nd.end]).strip().endswith(str(nd.number))
        q = tok.decode(p.ids[p.spans["question"][0]:]).strip()
        assert q == f"What is the special magic {p.answer.city} number? The special magic {p.answer.city} number is"
        assert p.spans["question"][1] == length
        # the filler counted by the generator is what the token spans say
        assert _filler_before(p, p.answer) == p.filler_before_answer
    pinned = next(p for p in prompts if p.answer.pinned)
    f_total = pinned.filler_total
    assert abs(_filler_before(pinned, pinned.answer) - f_total * depth / 100) <= 1  # requested depth, ±1 token
    if depth == 0:
        assert pinned.needles[0] is pinned.answer and pinned.answer.start == pinned.spans["intro"][1]
    if depth == 100:
        assert pinned.needles[-1] is pinned.answer and pinned.answer.end == pinned.spans["question"][0]


def test_needle_prompts_reproducible_by_seed(gen):
    a = gen.trial(400, 50, 4, 2, 3)
    b = gen.trial(400, 50, 4, 2, 3)
    c = gen.trial(400, 50, 4, 2, 4)
    assert [p.ids for p in a] == [p.ids for p in b]
    assert [p.ids for p in a] != [p.ids for p in c]
    # another sample index (salt) is another haystack/needle draw
    assert gen.trial(400, 50, 4, 2, 3, 1)[0].ids != a[0].ids


def test_needle_prompt_too_short_is_a_usage_error(gen):
    with pytest.raises(ValueError, match="too short"):
        gen.trial(40, 50, 6, 2, 0)


@pytest.mark.parametrize("text,answer,match,ok", [
    (": 12345.", 12345, "contains", True), (" is 1234 or 12345", 12345, "contains", True),
    (" 123456", 12345, "contains", False), (" 123456", 12345, "substring", True),
    (" 777 then 12345", 12345, "first", False), (" 12345 then 777", 12345, "first", True), ("", 5, "contains", False)])
def test_needle_match_rules(text, answer, match, ok):
    assert N.is_correct(text, answer, match) is ok


def _mock_needle(tok, mode):
    def respond(text):
        asked, found = needle_answers(text)
        if mode == "right":
            return f": {found[asked]}."
        wrong = sorted(c for c in found if c != asked)[0]
        return f": {found[wrong]}."
    return ScriptedAdapter(tok, respond=respond)


@pytest.mark.parametrize("mode,expected", [("right", 1.0), ("distractor", 0.0)])
def test_needle_scorer_with_scripted_models(tok, docs, tmp_path, mode, expected):
    adapter = _mock_needle(tok, mode)
    opts = N.NeedleOptions(data=str(docs), nr=["2/2", "3/1"], lengths=[300], depths=[0, 50, 100], samples=2)
    rec = N.run_needle(adapter, tok, opts, tmp_path / "out")
    res = rec["results"]
    assert [b["accuracy"] for b in res["by_nr"]] == [expected, expected]
    assert all(c["pinned_accuracy"] == expected and c["all_correct"] == expected for c in res["cells"])
    assert len(res["trials"]) == (2 + 1) * 3 * 2  # (R=2 questions + R=1 question) x depths x samples
    assert len(adapter.prompts) == len(res["trials"])
    assert (tmp_path / "out" / "needle_heatmap.png").stat().st_size > 1000
    assert json.loads((tmp_path / "out" / "results.json").read_text())["results"]["by_nr"] == res["by_nr"]


# ------------------------------------------------------------------------------------- attention noise

def _masks(s=10):
    m = {k: torch.zeros(s, dtype=torch.bool) for k in AN.CATEGORIES}
    m["bos"][0] = True
    m["answer"][3:5] = True
    m["query"][8:10] = True
    m["noise"] = ~(m["bos"] | m["answer"] | m["query"])
    m["distractors"][6] = True
    return m


def test_attention_shares_hand_computed():
    softmax_layer = torch.tensor([[[0.5, 0, 0, 0.2, 0.1, 0, 0, 0, 0.1, 0.1]],
                                  [[0.1] * 10]], dtype=torch.float64)  # (H=2, Q=1, S=10), rows sum to 1
    diff_row = [0.4, -0.1, 0, 0.3, 0.2, 0, -0.1, 0, 0.1, 0.0]  # a signed A1 − λA2 row, sum 0.8
    diff_layer = torch.tensor([[diff_row], [diff_row]], dtype=torch.float64)
    out = AN.attention_shares([softmax_layer, diff_layer], _masks(), "sum")
    # layer 1: head0 answer .3 bos .5 query .2 noise 0; head1 answer .2 bos .1 query .2 noise .5 (distractor .1)
    # layer 2 (÷0.8): answer .625, bos .5, query .125, noise −.25, distractors −.125
    assert out["per_layer"]["answer"] == pytest.approx([0.25, 0.625])
    assert out["answer"] == pytest.approx((0.25 + 0.625) / 2)
    assert out["bos"] == pytest.approx((0.3 + 0.5) / 2)
    assert out["query"] == pytest.approx((0.2 + 0.125) / 2)
    assert out["noise"] == pytest.approx((0.25 - 0.25) / 2)
    assert out["distractors"] == pytest.approx((0.05 - 0.125) / 2)
    assert out["answer"] + out["bos"] + out["query"] + out["noise"] == pytest.approx(1.0)
    absn = AN.attention_shares([diff_layer], _masks(), "abs")  # Σ|row| = 1.2
    assert absn["answer"] == pytest.approx(0.5 / 1.2)
    assert absn["noise"] == pytest.approx(-0.2 / 1.2)
    raw = AN.attention_shares([diff_layer], _masks(), "none")
    assert raw["answer"] == pytest.approx(0.5) and raw["bos"] == pytest.approx(0.4)


def test_attention_noise_end_to_end_on_scripted_maps(tok, docs, tmp_path):
    """A model whose last row puts all weight on the answer needle scores answer 1, noise 0."""
    from diffattn.eval.datasets import load_corpus

    gen = N.NeedleGenerator(tok, load_corpus(str(docs), tok).texts())  # the haystack the task will build
    length, depths = 320, [0, 50, 100]
    expected_spans = {}
    for d in depths:
        for s in range(2):
            p = gen.trial(length, d, 2, 1, 0, "attention-noise", s)[0]
            expected_spans[tuple(p.ids)] = (p.answer.start, p.answer.end)

    def maps(ids):
        a0, a1 = expected_spans[tuple(ids[0].tolist())]
        row = torch.zeros(1, 3, 1, ids.shape[1])
        row[..., a0:a1] = 1.0 / (a1 - a0)
        return [LayerMaps(row), LayerMaps(row.clone())]

    adapter = ScriptedAdapter(tok, maps=maps)
    opts = AN.AttentionNoiseOptions(data=str(docs), length=length, depths=depths, needles=2, samples=2)
    rec = AN.run_attention_noise(adapter, tok, opts, tmp_path / "an")
    for row in rec["results"]["by_depth"]:
        assert row["answer"] == pytest.approx(1.0) and row["noise"] == pytest.approx(0.0)
        assert row["bos"] == pytest.approx(0.0) and row["query"] == pytest.approx(0.0)
    assert (tmp_path / "an" / "attention_noise.png").is_file()


def test_category_masks_partition(gen):
    p = gen.trial(320, 50, 3, 1, 5)[0]
    m = AN.category_masks(p)
    total = m["answer"].long() + m["bos"].long() + m["query"].long() + m["noise"].long()
    assert bool((total == 1).all())
    assert int(m["answer"].sum()) == p.answer.end - p.answer.start
    assert bool(m["bos"][0]) and int(m["bos"].sum()) == 1  # no BOS token: the first token is the sink
    assert int(m["distractors"].sum()) == sum(nd.end - nd.start for nd in p.needles if nd is not p.answer)


# ------------------------------------------------------------------------------------- ICL

class FakeTok:
    """Just enough tokenizer for LabelChooser: fixed encodings."""

    table = {" a": [1], " ab": [1, 2], " c": [3], "\n": [9]}

    def encode(self, text):
        return list(self.table[text])


class TableAdapter:
    device = "cpu"

    def __init__(self, prefs):
        self.prefs = prefs  # generated-so-far tuple -> preferred token

    def last_logits(self, ids):
        gen = tuple(ids[0].tolist()[1:])  # prompt is [0]
        out = torch.zeros(1, 10)
        out[0, self.prefs[gen]] = 5.0
        return out


@pytest.mark.parametrize("prefs,expected", [({(): 3}, " c"), ({(): 1, (1,): 9}, " a"), ({(): 1, (1,): 2}, " ab"),
                                            ({(): 7}, " a")])  # 7 is not allowed: best allowed by logit order
def test_label_chooser_prefix_labels(prefs, expected):
    chooser = I.LabelChooser(FakeTok(), ["a", "ab", "c"], "\n")
    prefs = {k: v for k, v in prefs.items()}
    prefs.setdefault((1,), 9)
    idx = chooser.choose(TableAdapter(prefs), [0])
    assert " " + chooser.labels[idx] == expected


def _gold_lookup(path):
    return {json.loads(line)["text"]: json.loads(line)["label"] for line in open(path)}


def _icl_mock(tok, path, mode):
    gold = _gold_lookup(path)
    labels = sorted(set(gold.values()))
    seqs = {lab: tok.encode(" " + lab) for lab in labels}

    def score(ids):
        # the test example is the last "Input: ...\nLabel:"; what follows was generated so far
        text = tok.decode(ids)
        head, _, tail = text.rpartition("Label:")
        test_text = head.rpartition("Input: ")[2].rstrip("\n")
        target = {"oracle": gold[test_text], "business": "business",
                  "anti": sorted(lab for lab in labels if lab != gold[test_text])[0]}[mode]
        pos = next(k for k in range(len(seqs[target]) + 1) if tok.decode(seqs[target][:k]) == tail)
        out = torch.zeros(tok.vocab_size)
        if pos < len(seqs[target]):
            out[seqs[target][pos]] = 10.0
        return out
    return ScriptedAdapter(tok, score=score, max_len=2048)


@pytest.mark.parametrize("mode", ["oracle", "business", "anti"])
def test_icl_scorer_with_scripted_models(tok, tmp_path, mode):
    path = write_icl_jsonl(tmp_path / "icl.jsonl", n=45)
    adapter = _icl_mock(tok, path, mode)
    opts = I.IclOptions(datasets=[str(path)], shots=[0, 1, 4], runs=2, test_size=12, permutations=2)
    rec = I.run_icl(adapter, tok, opts, tmp_path / "icl")
    ds = rec["results"]["datasets"][0]
    gold = _gold_lookup(path)
    if mode == "oracle":
        expected = 1.0
    elif mode == "anti":
        expected = 0.0
    else:
        order = list(dict.fromkeys((t, lab) for t, lab in gold.items()))
        from diffattn.eval.common import seeded

        seeded(0, "icl-split", "icl.jsonl").shuffle(order)
        expected = sum(lab == "business" for _, lab in order[:12]) / 12
    assert [c["accuracy_mean"] for c in ds["curve"]] == pytest.approx([expected] * 3)
    for a in ds["robustness"]["arrangements"].values():
        assert a["mean"] == pytest.approx(expected) and a["spread"] == 0.0
    assert ds["n_labels"] == 3 and ds["test_size"] == 12
    assert (tmp_path / "icl" / "icl_accuracy.png").is_file() and (tmp_path / "icl" / "icl_robustness.png").is_file()


def test_icl_arrangements():
    demos = [([i], lab) for i, lab in enumerate("aaabbbccc")]
    from diffattn.eval.common import seeded

    for how in I.ARRANGEMENTS:
        out = I.arrange(demos, how, seeded(0, how))
        assert sorted(out) == sorted(demos)  # a permutation
    grouped = [lab for _, lab in I.arrange(demos, "grouped", seeded(1))]
    assert sum(grouped[i] != grouped[i + 1] for i in range(8)) == 2  # three contiguous blocks
    alt = [lab for _, lab in I.arrange(demos, "alternating", seeded(2))]
    assert all(alt[i] != alt[i + 1] for i in range(8)) and alt[:3] == alt[3:6] == alt[6:]
    bal = I.balanced_draw(demos, 6, seeded(3))
    assert sorted(lab for _, lab in bal) == list("aabbcc")


def test_icl_prompt_drops_earliest_demos_to_fit():
    ids, k = I.build_prompt([0], [[1, 1], [2, 2], [3, 3]], [9], [7], budget=8)
    assert ids == [0, 2, 2, 9, 3, 3, 9, 7] and k == 2


# ------------------------------------------------------------------------------------- hallucination

def test_content_items_and_support():
    items = H.content_items("The BBC said Tony Blair met 1,200 voters in London on Monday.")
    assert items["numbers"] == ["1200"]
    assert "BBC" in items["entities"] and "Tony Blair" in items["entities"] and "London" in items["entities"]
    assert "voters" in items["words"] and "the" not in items["words"]
    src = "Voters in London met Tony Blair; 1200 people came, the BBC said on Monday."
    u = H.unsupported("The BBC said Tony Blair met 1,200 voters in London on Monday.", src)
    assert u["n_unsupported"] == 0 and u["rate"] == 0.0
    u = H.unsupported("Gordon Brown met 300 farmers in Leeds.", src)
    assert set(u["unsupported"]["entities"]) == {"Gordon Brown", "Leeds"}
    assert u["unsupported"]["numbers"] == ["300"]
    assert u["rate"] == pytest.approx(u["n_unsupported"] / u["total"]) and u["rate"] > 0.5
    assert H.unsupported("", src)["rate"] is None


def test_rouge_hand_computed():
    assert H.rouge_1_f1("the cat sat", "the cat ran away") == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert H.rouge_l_f1("a b c d", "a c d") == pytest.approx(2 * (3 / 4) * 1.0 / (3 / 4 + 1.0))
    assert H.rouge_1_f1("", "x") == 0.0


@pytest.mark.parametrize("qa", [False, True])
def test_hallucination_oracle_and_hallucinating_models(tok, tmp_path, qa):
    path = write_grounded_jsonl(tmp_path / "g.jsonl", qa=qa, n=6)

    def oracle(text):  # copies the first sentence of the test source
        src = text.rpartition("Text: " if not qa else "Context: ")[2]
        return " " + re.split(r"(?<=\.)\s", src, maxsplit=1)[0]

    def liar(text):
        return " Zanzibar quokkas ate 777 bananas"

    opts = H.HallucinationOptions(datasets=[str(path)], samples=4, shots=1, max_new_tokens=200)
    good = H.run_hallucination(ScriptedAdapter(tok, respond=oracle), tok, opts, tmp_path / "good")
    bad = H.run_hallucination(ScriptedAdapter(tok, respond=liar), tok, opts, tmp_path / "bad")
    g, b = good["results"]["datasets"][0], bad["results"]["datasets"][0]
    assert g["unsupported_rate"] == 0.0 and g["faithful_share"] == 1.0 and g["unsupported_rate_micro"] == 0.0
    assert b["unsupported_rate"] == 1.0 and b["faithful_share"] == 0.0
    assert b["unsupported_rate_by_kind"] == {"words": 1.0, "numbers": 1.0, "entities": 1.0}
    assert g["rouge1_f1"] > b["rouge1_f1"] == 0.0
    assert g["kind"] == ("qa" if qa else "summarisation")
    assert "proxy" in good["results"]["proxy_note"].lower()
    assert "PROXY" in (tmp_path / "good" / "results.md").read_text()


# ------------------------------------------------------------------------------------- quant, outliers

def test_absmax_quantize_hand_values():
    x = torch.tensor([[[[1.0, -0.6, 0.26, 9.0]]]])  # 9.0 is masked out of the absmax
    allowed = torch.tensor([[[[True, True, True, False]]]])
    q = absmax_quantize(x, allowed, 2, "tensor")  # qmax 1, s = 1.0
    assert q.tolist() == [[[[1.0, -1.0, 0.0, 1.0]]]]
    q4 = absmax_quantize(x, allowed, 4, "tensor")  # qmax 7, s = 1/7
    assert q4[0, 0, 0, :3].tolist() == pytest.approx([1.0, -4 / 7, 2 / 7])
    rows = torch.tensor([[[[1.0, 0.5], [4.0, 1.0]]]])
    assert absmax_quantize(rows, None, 2, "row").tolist() == [[[[1.0, 0.0], [4.0, 0.0]]]]
    heads = torch.tensor([[[[1.0, 0.4]], [[10.0, 4.0]]]])  # (B=1, H=2, T=1, S=2)
    torch.testing.assert_close(absmax_quantize(heads, None, 3, "head"),  # qmax 3: 0.4 -> 1/3, 4 -> 10/3
                               torch.tensor([[[[1.0, 1 / 3]], [[10.0, 10 / 3]]]]))
    z = torch.zeros(1, 1, 2, 2)
    assert absmax_quantize(z, None, 4).tolist() == z.tolist()  # no division by zero


def test_abs_stats_top_k_exact_and_median_close():
    g = torch.Generator().manual_seed(0)
    vals = torch.randn(50_000, generator=g).abs() * torch.exp(torch.randn(50_000, generator=g))
    st = AbsStats()
    for chunk in vals.split(7_000):
        st.add(chunk)
    res = st.result()
    top = torch.sort(vals, descending=True).values
    for k in (1, 2, 3, 10, 100):
        assert res[f"top{k}"] == pytest.approx(float(top[k - 1]))
    assert res["median"] == pytest.approx(float(np.median(vals.numpy())), rel=2e-3)
    assert res["count"] == 50_000
