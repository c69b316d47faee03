"""Benchmark metrics, rule for rule as lmms-eval ``LMMS_EVAL_VERSION`` computes them.

Every function scores one prediction; the aggregations over a benchmark live in
``dvsft.evaluation.benchmarks``. Beside the benchmark rules: the OCR tasks' CER and word accuracy,
and the region tasks' ROUGE-L and IoU (``dvsft compare``). Quirks of the reference code are kept on purpose and
noted where they matter, so our numbers compare with published lmms-eval numbers; the test
suite checks them item by item against lmms-eval's own task code (tests/test_lmms_eval_parity.py).
"""

from __future__ import annotations

import re
import statistics
import string
from collections import Counter
from collections.abc import Iterable, Sequence

from rapidfuzz.distance import LCSseq, Levenshtein

LMMS_EVAL_VERSION = "0.7.3"  # the lmms-eval release whose rules the default ("lmms-eval") rules follow
RULES = ("lmms-eval", "official")  # "official": the benchmark's own script where it differs (OCRBench)
# lmms-eval's default --reasoning_tags: these blocks are cut from a prediction before scoring.
REASONING_TAGS = (("<think>", "</think>"), ("<analysis>", "</analysis>"))


def check_rules(rules: str) -> str:
    if rules not in RULES:
        raise ValueError(f"unknown metric rules {rules!r}; use one of {', '.join(RULES)}")
    return rules


def rules_label(rules: str) -> str:
    """The rule set as recorded in ``scores.json`` (``settings.metric_rules``)."""
    check_rules(rules)
    if rules == "official":
        return f"official (OCRBench: the official script; others as lmms-eval {LMMS_EVAL_VERSION})"
    return f"lmms-eval {LMMS_EVAL_VERSION}"


def strip_reasoning(text: str, tag_pairs: Sequence[tuple[str, str]] = REASONING_TAGS) -> str:
    """lmms-eval's ``strip_reasoning_tags``: cut closed tag blocks, keep what follows a lone end tag, strip."""
    result = text
    for start_tag, end_tag in tag_pairs:
        while start_tag in result and end_tag in result:
            start = result.find(start_tag)
            end = result.find(end_tag, start)
            if end == -1:
                break
            result = result[:start] + result[end + len(end_tag) :]
        if end_tag in result and start_tag not in result:
            result = result.rsplit(end_tag, 1)[-1]
    return result.strip()


def clean_prediction(prediction: str, rules: str = "lmms-eval") -> str:
    """The prediction a metric sees: lmms-eval cuts reasoning blocks and strips; the official scripts strip."""
    check_rules(rules)
    return strip_reasoning(prediction) if rules == "lmms-eval" else prediction.strip()


# ---------------------------------------------------------------- edit distance


def levenshtein(a: Sequence, b: Sequence) -> int:
    """Unit-cost edit distance between two strings (or two sequences of words), by rapidfuzz."""
    return Levenshtein.distance(a, b)


# ---------------------------------------------------------------- ANLS (DocVQA, InfoVQA)


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average normalized Levenshtein similarity of one question (lmms-eval ``anls``).

    Distance on ``" ".join(s.strip().lower().split())``; the length divisor is the max of
    the RAW lengths (as in lmms-eval and the official DocVQA script); score = 1 - min NL
    over answers, set to 0 when it is below ``threshold`` (so NL = 0.5 exactly keeps 0.5).
    """
    if not answers:
        raise ValueError("ANLS needs at least one ground-truth answer")
    det = " ".join(prediction.strip().lower().split())
    values = []
    for answer in answers:
        gt = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else levenshtein(gt, det) / length)
    result = 1 - min(values)
    return 0.0 if result < threshold else result


# ---------------------------------------------------------------- ChartQA relaxed accuracy


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA: numbers within 5% of a nonzero numeric target ("12%" reads 0.12), else case-insensitive equality.

    No stripping, as in lmms-eval: only what ``float()`` tolerates (so "12% " is compared as text).
    """
    pred_f, target_f = _to_float(prediction), _to_float(target)
    if pred_f is not None and target_f:
        return abs(pred_f - target_f) / abs(target_f) <= max_relative_change
    return prediction.lower() == target.lower()


# ---------------------------------------------------------------- VQA accuracy (TextVQA)


class EvalAIAnswerProcessor:
    """The EvalAI / mmf answer normalisation that lmms-eval applies for TextVQA."""

    # fmt: off
    CONTRACTIONS = {
        "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
        "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
        "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
        "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
        "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
        "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
        "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
        "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
        "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
        "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
        "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
        "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
        "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
        "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
        "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
        "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
        "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
        "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
        "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
        "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
        "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
        "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
        "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
        "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
        "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
        "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
        "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
        "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
        "youve": "you've",
    }
    NUMBER_MAP = {
        "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
        "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
    }
    ARTICLES = ("a", "an", "the")
    # "(?!<=\d)" is a lookahead for the literal "<=" + digit in the reference code (a typo for a
    # lookbehind); kept verbatim so results match.
    PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
    COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
    PUNCTUATIONS = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                    ",", "?", "!"]
    # fmt: on

    def word_tokenize(self, word: str) -> str:
        word = word.lower()
        word = word.replace(",", "").replace("?", "").replace("'s", " 's")
        return word.strip()

    def process_punctuation(self, in_text: str) -> str:
        out_text = in_text
        for p in self.PUNCTUATIONS:
            if (p + " " in in_text or " " + p in in_text) or (re.search(self.COMMA_STRIP, in_text) is not None):
                out_text = out_text.replace(p, "")
            else:
                out_text = out_text.replace(p, " ")
        # The reference passes re.UNICODE (= 32) positionally, i.e. as ``count``: at most 32 periods go.
        return self.PERIOD_STRIP.sub("", out_text, count=int(re.UNICODE))

    def process_digit_article(self, in_text: str) -> str:
        words = [self.NUMBER_MAP.get(w, w) for w in in_text.lower().split()]
        words = [self.CONTRACTIONS.get(w, w) for w in words if w not in self.ARTICLES]
        return " ".join(words)

    def __call__(self, item: str) -> str:
        item = self.word_tokenize(item)
        item = item.replace("\n", " ").replace("\t", " ").strip()
        item = self.process_punctuation(item)
        return self.process_digit_article(item)


_EVALAI = EvalAIAnswerProcessor()


def vqa_normalize(text: str) -> str:
    """EvalAI answer normalisation (lowercase, punctuation, articles, number words, contractions)."""
    return _EVALAI(text)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy: mean over the GT answers of min(1, #matches among the OTHER answers / 3).

    With the usual 10 answers this is lmms-eval's TextVQA score. With a single answer the formula
    degenerates to 0 for every prediction, so one answer falls back to normalised exact match.
    """
    if not answers:
        raise ValueError("VQA accuracy needs at least one ground-truth answer")
    pred = vqa_normalize(prediction)
    gts = [vqa_normalize(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    accs = []
    for i in range(len(gts)):
        matching = sum(1 for j, gt in enumerate(gts) if j != i and gt == pred)
        accs.append(min(1.0, matching / 3))
    return float(statistics.mean(accs))  # exact mean, rounded once (as lmms-eval), not sum / len


# ---------------------------------------------------------------- OCRBench


def fold_fullwidth(text: str) -> str:
    """Full-width ASCII (U+FF01..U+FF5E) and the ideographic space (U+3000) as ASCII, nothing else changed."""
    out = []
    for ch in text:
        code = ord(ch)
        if 0xFF01 <= code <= 0xFF5E:
            out.append(chr(code - 0xFEE0))
        elif code == 0x3000:
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def ocrbench_score(prediction: str, answers: str | Sequence[str], dataset: str, rules: str = "lmms-eval") -> int:
    """1 if a GT answer is a substring of the prediction, else 0 (OCRBench rule).

    Ordinary items compare lowercased and stripped, newlines as spaces; lmms-eval (since 0.7.3) first
    folds full-width ASCII and the ideographic space to ASCII on both sides, the official script
    (``rules="official"``) does not. ``HME100k`` (handwritten math) compares with all spaces removed
    and case kept on both sides (lmms-eval lowercased the prediction up to 0.7.1; no longer).
    """
    check_rules(rules)
    fold = fold_fullwidth if rules == "lmms-eval" else (lambda t: t)
    pred = prediction.strip()
    answers = [answers] if isinstance(answers, str) else list(answers)
    for gt in answers:
        if dataset == "HME100k":
            answer = gt.strip().replace("\n", " ").replace(" ", "")
            predict = pred.strip().replace("\n", " ").replace(" ", "")
        else:
            answer = fold(gt).lower().strip().replace("\n", " ")
            predict = fold(pred).lower().strip().replace("\n", " ")
        if answer in predict:
            return 1
    return 0


# ---------------------------------------------------------------- OCRVQA, SQuAD


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """Case-insensitive exact match after stripping (OCR-VQA; Qwen-VL's ``evaluate_exact_match_accuracy``)."""
    pred = prediction.strip().lower()
    return float(any(pred == a.strip().lower() for a in answers))


def squad_normalize(text: str) -> str:
    """The official SQuAD v1.1 normalisation: lowercase, drop punctuation and articles, squeeze spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1_single(prediction: str, ground_truth: str) -> float:
    pred_tokens = squad_normalize(prediction).split()
    gt_tokens = squad_normalize(ground_truth).split()
    common = Counter(pred_tokens) & Counter(gt_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gt_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_em(prediction: str, answers: Sequence[str]) -> float:
    """Official SQuAD exact match, max over the ground truths."""
    return max(float(squad_normalize(prediction) == squad_normalize(a)) for a in answers)


def squad_f1(prediction: str, answers: Sequence[str]) -> float:
    """Official SQuAD token F1, max over the ground truths."""
    return max(squad_f1_single(prediction, a) for a in answers)


# ---------------------------------------------------------------- MME


def mme_parse(prediction: str) -> str:
    """'yes', 'no' or 'other' from the start of an answer (lmms-eval / Otter ``parse_pred_ans``)."""
    pred = prediction.lower().strip().replace(".", "")
    if pred in ("yes", "no"):
        return pred
    if len(pred) == 1:
        return {"y": "yes", "n": "no"}.get(pred, "other")
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_correct(prediction: str, answer: str) -> float:
    gt = answer.lower().strip().replace(".", "")
    if gt not in ("yes", "no"):
        raise ValueError(f"MME answers are Yes or No, got {answer!r}")
    return float(mme_parse(prediction) == gt)


def yes_no_metrics(pairs: Iterable[tuple[str, str]]) -> dict[str, float]:
    """Yes/no accuracy, precision, recall and F1 ("yes" positive) over (answer, prediction) pairs, in %.

    Predictions are parsed with ``mme_parse``. Accuracy counts every question (an "other" answer is
    wrong); precision and recall leave "other" answers out, as MME's official ``calculation.py`` does.
    """
    gts, preds = [], []
    for answer, prediction in pairs:
        gt = answer.lower().strip().replace(".", "")
        if gt not in ("yes", "no"):
            raise ValueError(f"MME answers are Yes or No, got {answer!r}")
        gts.append(gt)
        preds.append(mme_parse(prediction))
    n = len(gts)
    if not n:
        return {"n": 0}
    tp = sum(g == "yes" and p == "yes" for g, p in zip(gts, preds, strict=True))
    fp = sum(g == "no" and p == "yes" for g, p in zip(gts, preds, strict=True))
    fn = sum(g == "yes" and p == "no" for g, p in zip(gts, preds, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100.0 * sum(g == p for g, p in zip(gts, preds, strict=True)) / n,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * preds.count("yes") / n,
        "other": preds.count("other"),
        "n": n,
    }


# ---------------------------------------------------------------- OCR tasks


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def cer(prediction: str, reference: str) -> float:
    """Character error rate: edit distance / reference length, on whitespace-squeezed text (may exceed 1)."""
    pred, ref = normalize_whitespace(prediction), normalize_whitespace(reference)
    return error_rate(levenshtein(pred, ref), len(ref), len(pred))


def error_rate(edits: int, reference_chars: int, prediction_chars: int) -> float:
    """``edits / reference_chars``; an empty reference gives 0 for an empty prediction, else 1."""
    return edits / reference_chars if reference_chars else float(prediction_chars > 0)


def aligned_word_matches(pred_words: Sequence[str], ref_words: Sequence[str]) -> int:
    """Words matched in a minimum-edit-distance alignment of two word sequences.

    Among all alignments with the least word edits (substitution, insertion, deletion of a whole
    word) the one with the most exact matches is taken, so the count is well defined.
    """
    n, m = len(pred_words), len(ref_words)
    # cost[j] = (edits, -matches) for pred[:i] vs ref[:j]
    prev = [(j, 0) for j in range(m + 1)]
    for i in range(1, n + 1):
        cur = [(i, 0)]
        for j in range(1, m + 1):
            same = pred_words[i - 1] == ref_words[j - 1]
            diag = (prev[j - 1][0], prev[j - 1][1] - 1) if same else (prev[j - 1][0] + 1, prev[j - 1][1])
            cur.append(min(diag, (prev[j][0] + 1, prev[j][1]), (cur[j - 1][0] + 1, cur[j - 1][1])))
        prev = cur
    return -prev[m][1]


def word_accuracy(prediction: str, reference: str) -> float:
    """Matched words / reference words, with words aligned by ``aligned_word_matches`` (case-sensitive)."""
    pred, ref = prediction.split(), reference.split()
    return matched_share(aligned_word_matches(pred, ref), len(ref), len(pred))


def matched_share(matched: int, reference_words: int, prediction_words: int) -> float:
    """``matched / reference_words``; an empty reference gives 1 for an empty prediction, else 0."""
    return matched / reference_words if reference_words else float(prediction_words == 0)


# ---------------------------------------------------------------- region tasks (GranViT, FineViT)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased whitespace tokens (longest common subsequence)."""
    p, r = prediction.lower().split(), reference.lower().split()
    if not p or not r:
        return float(p == r)
    lcs = LCSseq.similarity(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes (0 for degenerate boxes)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0
