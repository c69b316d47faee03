"""Metric rules of dvsft.evaluation.metrics, each against hand-computed values (lmms-eval definitions)."""

import random

import pytest

from dvsft.evaluation import metrics as M


@pytest.mark.parametrize(
    "a,b,d",
    [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3), ("flaw", "lawn", 2), ("same", "same", 0)],
)
def test_levenshtein(a, b, d):
    assert M.levenshtein(a, b) == d
    assert M.levenshtein(b, a) == d
    assert M.levenshtein(list(a), list(b)) == d


# ------------------------------------------------------------------ ANLS


def test_anls_normalises_case_and_spaces():
    assert M.anls("  The   Cat ", ["the cat"]) == 1.0


def test_anls_one_edit():
    assert M.anls("cat", ["car"]) == pytest.approx(1 - 1 / 3)


def test_anls_threshold_boundary_is_kept_and_below_is_zero():
    # NL = 2/4 = 0.5 exactly: 1 - 0.5 is not below the 0.5 threshold, so lmms-eval keeps 0.5
    assert M.anls("abcd", ["abxy"]) == pytest.approx(0.5)
    # NL = 3/5: similarity 0.4 < 0.5 -> 0
    assert M.anls("abcde", ["axyze"]) == 0.0


def test_anls_divides_by_raw_lengths():
    # distance on normalised "ab" vs "ax" is 1, but the divisor is the raw prediction length 6
    assert M.anls("  ab  ", ["ax"]) == pytest.approx(1 - 1 / 6)


def test_anls_whitespace_of_raw_generations_counts_in_the_divisor_only():
    # U+3000, CRLF, NBSP, tabs: gone for the distance (str.split), kept in the raw lengths that divide it
    assert M.anls("\u3000ab\r\n", ["abcd"]) == pytest.approx(1 - 2 / 5)  # stripped first it would be 1 - 2/4
    assert M.anls("abc", ["\xa0abcd\xa0"]) == pytest.approx(1 - 1 / 6)
    assert M.anls("ab\t", ["ab"]) == 1.0


def test_anls_takes_the_best_answer():
    assert M.anls("cat", ["dog", "cat"]) == 1.0
    assert M.anls("", [""]) == 1.0
    with pytest.raises(ValueError, match="at least one"):
        M.anls("x", [])


# ------------------------------------------------------------------ ChartQA


@pytest.mark.parametrize(
    "pred,target,ok",
    [
        ("12", "12.5", True),  # 4% off
        ("11.8", "12.5", False),  # 5.6% off
        ("105", "100", True),  # exactly 5%
        ("105.1", "100", False),
        ("45%", "0.45", True),  # percent divided by 100
        ("45", "45%", False),  # 45 vs 0.45
        ("0", "0", True),  # zero target: string comparison
        ("0.0", "0", False),
        ("Yes", "yes", True),  # case-insensitive text
        ("yes ", "yes", False),  # no stripping of text
        (" 12", "12", True),  # float() tolerates surrounding spaces
        ("12\u3000", "12", True),  # and any Unicode whitespace
        ("\t50%", "0.5", True),
        ("12%\n", "12%", False),  # the newline hides the percent sign from float()
        ("0\n", "0", False),  # zero target: raw text, so a trailing newline is a difference
        ("0", " 0", False),
        ("0.0\r\n", "0.0", False),
        ("-3", "-3.1", True),
    ],
)
def test_relaxed_correctness(pred, target, ok):
    assert M.relaxed_correctness(pred, target) is ok


# ------------------------------------------------------------------ VQA accuracy


@pytest.mark.parametrize(
    "text,norm",
    [
        ("Two.", "2"),
        ("The Dog!", "dog"),
        ("1,000", "1000"),
        ("dont", "don't"),
        ("hello-world", "hello world"),
        ("3.14", "3.14"),
        ("end.", "end"),
        ("It's   a\tcat", "it 's cat"),
        ("yes, sir", "yes sir"),
        ("\xa0two\r\n", "2"),
        ("new\xa0york", "new york"),  # split() takes any whitespace
        ("a\u3000dog", "dog"),
    ],
)
def test_evalai_normalisation(text, norm):
    assert M.vqa_normalize(text) == norm


def test_vqa_accuracy_ten_answer_formula():
    answers = ["yes"] * 3 + ["no"] * 7
    # "yes" rows see 2 other yes -> 2/3; "no" rows see 3 yes -> 1
    assert M.vqa_accuracy("yes", answers) == pytest.approx((3 * 2 / 3 + 7) / 10)
    assert M.vqa_accuracy("No", answers) == 1.0
    answers = ["cat"] + ["dog"] * 9
    assert M.vqa_accuracy("cat", answers) == pytest.approx(9 * (1 / 3) / 10)
    assert M.vqa_accuracy("bird", answers) == 0.0
    assert M.vqa_accuracy("Two", ["2"] * 10) == 1.0


def test_vqa_accuracy_single_answer_falls_back_to_exact_match():
    assert M.vqa_accuracy("The Dog", ["dog"]) == 1.0
    assert M.vqa_accuracy("cat", ["dog"]) == 0.0


# ------------------------------------------------------------------ OCRBench


def test_ocrbench_substring_rule():
    assert M.ocrbench_score("The answer is CENTRE.", ["centre"], "IIIT5K") == 1
    assert M.ocrbench_score("The answer is CENTRE.", ["center"], "IIIT5K") == 0
    assert M.ocrbench_score("hello\nworld", ["Hello World"], "svt") == 1
    assert M.ocrbench_score("total: 12", "12", "SROIE") == 1  # answer given as a string
    assert M.ocrbench_score("foo", ["bar", " FOO "], "ctw") == 1


@pytest.mark.parametrize("rules", ["lmms-eval", "official"])
def test_ocrbench_hme100k_ignores_spaces_keeps_case(rules):
    assert M.ocrbench_score("x ^ { 2 } + 1", ["x^{2}+1"], "HME100k", rules) == 1
    # lmms-eval >= 0.7.2 and the official script keep the prediction's case (lmms-eval <= 0.7.1 lowercased it)
    assert M.ocrbench_score(r"\frac{A}{B}", [r"\frac{A}{B}"], "HME100k", rules) == 1
    assert M.ocrbench_score(r"\frac{a}{b}", [r"\frac{A}{B}"], "HME100k", rules) == 0


def test_ocrbench_whitespace_of_raw_generations():
    assert M.ocrbench_score("central\r\n", ["CENTRAL"], "IIIT5K") == 1
    assert M.ocrbench_score("\tＡ\u3000Ｂ\n", ["a b"], "svt") == 1
    # HME100k removes only ASCII spaces: a tab or an ideographic space inside the formula stays
    assert M.ocrbench_score("x ^ { 2 } + 1\r\n", ["x^{2}+1"], "HME100k") == 1
    assert M.ocrbench_score("x^{2}\t+1", ["x^{2}+1"], "HME100k") == 0
    assert M.ocrbench_score("x^{2}\u3000+1", ["x^{2}+1"], "HME100k") == 0


def test_ocrbench_fullwidth_folding_only_under_lmms_eval_rules():
    assert M.fold_fullwidth("ＣＥＮＴＲＡＬ\u3000１２！") == "CENTRAL 12!"
    assert M.fold_fullwidth("中文ｶﾀ") == "中文ｶﾀ"  # only U+FF01..FF5E and U+3000 move
    assert M.ocrbench_score("ＣＥＮＴＲＡＬ", ["central"], "IIIT5K") == 1
    assert M.ocrbench_score("ＣＥＮＴＲＡＬ", ["central"], "IIIT5K", "official") == 0
    assert M.ocrbench_score("ｘ＾２", ["x^2"], "HME100k") == 0  # HME100k is never folded
    with pytest.raises(ValueError, match="unknown metric rules"):
        M.ocrbench_score("a", ["a"], "IIIT5K", "lmms")


def test_clean_prediction_cuts_reasoning_blocks_as_lmms_eval():
    assert M.clean_prediction("  <think>it is 3</think>\n 4 ") == "4"
    assert M.clean_prediction("reasoning...</analysis>Yes") == "Yes"  # prefilled opening tag
    assert M.clean_prediction("<think>unclosed answer ") == "<think>unclosed answer"
    assert M.clean_prediction(" <think>a</think>4 ", "official") == "<think>a</think>4"


# ------------------------------------------------------------------ OCR-VQA, SQuAD


def test_mme_yes_no_metrics():
    pairs = [("Yes", "Yes"), ("Yes", "no."), ("No", "No"), ("No", "yes, it is"), ("Yes", "maybe"), ("No", "n")]
    m = M.yes_no_metrics(pairs)
    # parsed: yes, no, no, yes, other, no -> tp 1, fn 1, tn 2, fp 1, one other (left out of P and R)
    assert m["accuracy"] == pytest.approx(100 * 3 / 6) and m["other"] == 1 and m["n"] == 6
    assert m["precision"] == pytest.approx(50.0) and m["recall"] == pytest.approx(50.0)
    assert m["f1"] == pytest.approx(50.0) and m["yes_ratio"] == pytest.approx(100 * 2 / 6)
    assert M.yes_no_metrics([("No", "No")])["f1"] == 0.0  # no positives: 0, not a division error
    with pytest.raises(ValueError, match="Yes or No"):
        M.yes_no_metrics([("maybe", "yes")])


def test_exact_match():
    assert M.exact_match(" Harry Potter ", ["harry potter"]) == 1.0
    assert M.exact_match("Harry Potter\u3000\r\n", ["\xa0harry potter"]) == 1.0  # str.strip: any whitespace
    assert M.exact_match("Harry Potter.", ["harry potter"]) == 0.0


def test_squad_em_f1():
    assert M.squad_em("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert M.squad_em("Eiffel", ["eiffel tower"]) == 0.0
    # tokens [in, eiffel, tower, in, paris] vs [eiffel, tower]: P 2/5, R 1
    assert M.squad_f1("in the Eiffel Tower in Paris", ["Eiffel Tower"]) == pytest.approx(2 * 0.4 / 1.4)
    assert M.squad_f1("Paris", ["London", "paris."]) == 1.0
    assert M.squad_f1("", ["x"]) == 0.0


# ------------------------------------------------------------------ MME


@pytest.mark.parametrize(
    "pred,label",
    [
        ("Yes", "yes"),
        ("No.", "no"),
        ("y", "yes"),
        ("n", "no"),
        ("x", "other"),
        ("Yes, there is a cat.", "yes"),
        ("Not sure", "no"),  # "no" within the first four characters
        ("I think yes", "other"),
        ("nope", "no"),
        ("\u3000Yes\r\n", "yes"),
        ("Y\t", "yes"),
        ("\xa0no.", "no"),
    ],
)
def test_mme_parse(pred, label):
    assert M.mme_parse(pred) == label


def test_mme_correct():
    assert M.mme_correct("Yes.", "Yes") == 1.0
    assert M.mme_correct("no", "Yes") == 0.0
    with pytest.raises(ValueError, match="Yes or No"):
        M.mme_correct("yes", "Maybe")


# ------------------------------------------------------------------ OCR tasks


def test_cer():
    assert M.cer("helo world", "hello world") == pytest.approx(1 / 11)
    assert M.cer("hello   world\n", "hello world") == 0.0
    assert M.cer("", "abc") == 1.0
    assert M.cer("abcdef", "ab") == 2.0  # insertions can push CER above 1


def test_word_accuracy_alignment():
    ref = "the cat sat on the mat"
    assert M.word_accuracy("the cat sat mat", ref) == pytest.approx(4 / 6)
    assert M.word_accuracy(ref, ref) == 1.0
    assert M.word_accuracy("", ref) == 0.0
    # extra words do not lower it (they are insertions), wrong order does
    assert M.word_accuracy("so the cat sat on the mat ok", ref) == 1.0
    assert M.aligned_word_matches(["a", "b", "c"], ["a", "x", "c"]) == 2
    # "cat the" vs "the cat": all minimum (2-edit) alignments are scanned; the best keeps 1 match
    assert M.word_accuracy("cat the", "the cat") == 0.5
    assert M.word_accuracy("The cat", "the cat") == 0.5  # case-sensitive


# ------------------------------------------------------------------ region tasks


def test_rouge_l_and_iou():
    assert M.rouge_l("the tire is black", "the tire is black") == 1.0
    # LCS("a white pot on the stove", "a white bowl on a stove") = a white on stove -> 4; P = 4/6, R = 4/6
    assert M.rouge_l("a white pot on the stove", "a white bowl on a stove") == pytest.approx(4 / 6)
    assert M.rouge_l("", "x") == 0.0
    assert M.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert M.iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


def edit_distance_reference(a, b) -> int:
    """The textbook dynamic programme for unit-cost edit distance."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def lcs_reference(a, b) -> int:
    """The textbook dynamic programme for the longest common subsequence's length."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def test_edit_distance_and_lcs_match_the_textbook_programmes():
    """rapidfuzz's distances, on characters and on words, against the textbook dynamic programmes."""
    rng = random.Random(0)
    for _ in range(500):
        a, b = ("".join(rng.choices("ab c", k=rng.randint(0, 30))) for _ in range(2))
        assert M.levenshtein(a, b) == edit_distance_reference(a, b)
        wa, wb = a.split(), b.split()
        assert M.levenshtein(wa, wb) == edit_distance_reference(wa, wb)
        lcs = lcs_reference(wa, wb)
        expected = 0.0 if not lcs else 2 * (lcs / len(wa)) * (lcs / len(wb)) / (lcs / len(wa) + lcs / len(wb))
        assert M.rouge_l(a, b) == pytest.approx(expected if wa and wb else float(wa == wb))
