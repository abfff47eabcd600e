"""MinHash sketches, LSH candidates and their verification, vectorized with numpy.

The algorithm behind the dedupe stage (pipeline/dedupe.py); no I/O here. No Python loop
runs per word, per shingle or per permutation.

Words: the text's code points (UTF-32) go through two tables over the Basic Multilingual
Plane: what belongs to a word (letters, digits, combining marks; not `_`) and its lower case
(digits folded to `0`, as datatrove's `simplify_text` does for numbers). Every other
character separates words, so two extractions of one text that differ in quotes, dashes,
line wrapping or case give the same words. Each word's hash is a polynomial hash of its
code points taken from one prefix sum modulo 2^64 (the inverse powers of the odd base
bring every word to position 0), finished with the splitmix64 mixer.

Shingles: n consecutive word hashes, each times its own odd constant, summed and mixed;
the signature works on their top 32 bits.

Signature: `num_perm` permutations h_k(x) = a_k * x + b_k (mod 2^32, a_k odd) applied to
blocks of shingles as one (num_perm x block) array, minimum per row: MinHash. Two documents
agree at position k with probability equal to the Jaccard index of their shingle sets
(checked against exact Jaccard on real pairs: no bias, binomial spread).

Bottom-k: the k smallest distinct shingle values of the document (and of each chunk), to
verify LSH candidates with an error of about sqrt(J(1-J)/k), exact below k shingles.

Chunks: a document of at least twice `chunk_words` words is also cut into content-defined
chunks: a chunk ends after a word bigram whose hash is 0 modulo `chunk_words * 3 // 4`, at
least `chunk_words // 4` and at most `4 * chunk_words` words after the previous cut. Cuts
depend on the words around them, not on positions, so a text embedded in a longer file is
cut at the same places. Chunk signatures are segmented minima of the same permuted
shingles (np.minimum.reduceat): the whole document's signature is their minimum.

LSH: the signature is cut into `bands` bands of `rows` values; items sharing a band's
values are candidates (probability 1 - (1 - J^rows)^bands), verified with bottom-k.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import numpy as np
import xxhash

U64 = np.uint64
SENTINEL32 = np.uint32(0xFFFFFFFF)  # the signature of a document without words

_BASE = 0x9E3779B97F4A7C15  # odd: invertible modulo 2^64
_BASE_INV = pow(_BASE, -1, 1 << 64)
_LEN_MULT = U64(0xC2B2AE3D27D4EB4F)
_SPACE = re.compile(r"\s")

# Per-position multipliers of the shingle combination (odd, fixed, from a seeded generator).
_SHINGLE_MULT = (np.random.default_rng(0x5EED).integers(1, 2**62, size=64, dtype=np.uint64)
                 * U64(2) + U64(1))


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, in place on a uint64 array (and returned)."""
    x ^= x >> U64(30)
    x *= U64(0xBF58476D1CE4E5B9)
    x ^= x >> U64(27)
    x *= U64(0x94D049BB133111EB)
    x ^= x >> U64(31)
    return x


class _Tables:
    """Lazily built lookup tables over the Basic Multilingual Plane and the hash powers.

    `word[c]`: whether code point c belongs to a word (letters, digits, combining marks;
    not `_`); `fold[c]`: its lower case (digits folded to `0`). `pow`/`inv`: BASE^i and
    BASE^-i modulo 2^64, grown on demand.
    """

    def __init__(self) -> None:
        self.word: np.ndarray | None = None
        self.fold: np.ndarray | None = None
        self.pow = np.ones(1, dtype=np.uint64)
        self.inv = np.ones(1, dtype=np.uint64)

    def classes(self) -> tuple[np.ndarray, np.ndarray]:
        if self.word is None:
            word = np.zeros(0x10000, dtype=bool)
            fold = np.arange(0x10000, dtype=np.uint32)
            for c in range(0x10000):
                ch = chr(c)
                if ch.isalnum() or unicodedata.category(ch).startswith("M"):
                    word[c] = True
                    if ch.isdigit():
                        fold[c] = ord("0")
                    elif len(low := ch.lower()) == 1:
                        fold[c] = ord(low)
            self.word, self.fold = word, fold
        return self.word, self.fold

    def powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self.pow.size < n:
            size = max(n, 2 * self.pow.size, 1 << 16)
            for name, base in (("pow", _BASE), ("inv", _BASE_INV)):
                arr = np.full(size, base, dtype=np.uint64)
                arr[0] = 1
                setattr(self, name, np.cumprod(arr, dtype=np.uint64))
        return self.pow[:n], self.inv[:n]


_TABLES = _Tables()


def word_spans(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(folded code points, word starts, word ends) of `text`, all numpy."""
    word, fold = _TABLES.classes()
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    if cp.size and int(cp.max()) > 0xFFFF:  # outside the BMP (emoji, ...): separators
        cp = np.where(cp > 0xFFFF, 0x20, cp)
    is_word = word[cp].view(np.int8)
    edges = np.flatnonzero(np.diff(is_word, prepend=np.int8(0), append=np.int8(0)))
    return fold[cp], edges[0::2], edges[1::2]


def words_of(text: str) -> list[str]:
    """The normalized words, as text (for tests and debugging; the hashes never build it)."""
    folded, starts, ends = word_spans(text)
    chars = "".join(map(chr, folded.tolist()))
    return [chars[s:e] for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]


def word_hashes(text: str, piece: int = 1 << 22) -> np.ndarray:
    """One well-mixed uint64 per word of `text` (see the module docstring).

    A long text is hashed in pieces of about `piece` characters cut at whitespace (never
    inside a word), which bounds the memory a giant document needs.
    """
    if len(text) > piece:
        parts, start = [], 0
        while start < len(text):
            cut = _SPACE.search(text, start + piece) if len(text) - start > piece else None
            end = cut.start() if cut else len(text)
            parts.append(_word_hashes(text[start:end]))
            start = end
        return np.concatenate(parts)
    return _word_hashes(text)


def _word_hashes(text: str) -> np.ndarray:
    folded, starts, ends = word_spans(text)
    if starts.size == 0:
        return np.zeros(0, dtype=np.uint64)
    pw, inv = _TABLES.powers(folded.size)
    prefix = np.empty(folded.size + 1, dtype=np.uint64)
    prefix[0] = 0
    np.cumsum(folded.astype(np.uint64) * pw, out=prefix[1:])
    h = (prefix[ends] - prefix[starts]) * inv[starts]
    h ^= (ends - starts).astype(np.uint64) * _LEN_MULT
    return mix64(h)


def shingle_hashes(words: np.ndarray, n: int) -> np.ndarray:
    """Hashes of the word n-grams (one shingle of all words when there are fewer than n)."""
    if words.size == 0:
        return np.zeros(0, dtype=np.uint64)
    n = min(n, words.size)
    m = words.size - n + 1
    out = words[:m] * _SHINGLE_MULT[0]
    for j in range(1, n):
        out += words[j: j + m] * _SHINGLE_MULT[j]
    return mix64(out)


def chunk_starts(words: np.ndarray, chunk_words: int) -> np.ndarray:
    """Content-defined cut points (word indices, starting with 0); one chunk if short."""
    n = words.size
    if chunk_words <= 0 or n < 2 * chunk_words:
        return np.zeros(1, dtype=np.int64)
    least, most = max(1, chunk_words // 4), 4 * chunk_words
    modulus = U64(max(1, chunk_words * 3 // 4))
    bigram = mix64(words[:-1] * _SHINGLE_MULT[0] + words[1:] * _SHINGLE_MULT[1])
    anchors = np.flatnonzero(bigram % modulus == 0) + 1  # a chunk starts after the anchor
    starts, last = [0], 0
    while True:
        i = int(np.searchsorted(anchors, last + least, side="left"))
        cut = min(int(anchors[i]) if i < anchors.size else n, last + most)
        if n - cut < least:  # the tail joins the last chunk
            break
        starts.append(cut)
        last = cut
    return np.asarray(starts, dtype=np.int64)


@dataclass(frozen=True)
class Sketch:
    """One document's sketches: whole document, and its chunks when it has several."""

    words: int  # normalized words
    size: int  # distinct shingles (32-bit)
    signature: np.ndarray  # (num_perm,) uint32 MinHash; all SENTINEL32 without words
    bottom: np.ndarray  # (bottom_k,) uint32: the smallest distinct shingle values, padded
    chunk_words: np.ndarray  # (chunks,) int64; no rows when the document is one chunk
    chunk_sizes: np.ndarray  # (chunks,) int64
    chunk_signatures: np.ndarray  # (chunks, num_perm) uint32
    chunk_bottoms: np.ndarray  # (chunks, bottom_k) uint32


class MinHasher:
    """Computes sketches with fixed parameters; the same seed gives the same permutations.

    `bottom_k` also keeps the k smallest distinct shingle values of every document and
    chunk (a bottom-k sketch): it verifies LSH candidates with a Jaccard estimate whose
    error is about sqrt(J(1-J)/k), and is exact when a document has at most k shingles.
    """

    def __init__(self, shingle_words: int = 2, num_perm: int = 126, seed: int = 1,
                 chunk_words: int = 0, bottom_k: int = 512, block: int = 4096):
        if shingle_words < 1 or num_perm < 1 or bottom_k < 1:
            raise ValueError("shingle_words, num_perm and bottom_k must be at least 1")
        self.shingle_words = shingle_words
        self.num_perm = num_perm
        self.chunk_words = chunk_words
        self.bottom_k = bottom_k
        self.block = block
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 2**32, size=num_perm, dtype=np.uint32) | np.uint32(1)
        self.b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint32)

    def sketch(self, text: str) -> Sketch:
        k, perms = self.bottom_k, self.num_perm
        words = word_hashes(text)
        shingles = (shingle_hashes(words, self.shingle_words) >> U64(32)).astype(np.uint32)
        if shingles.size == 0:
            return Sketch(0, 0, np.full(perms, SENTINEL32, dtype=np.uint32),
                          np.full(k, SENTINEL32, dtype=np.uint32), np.zeros(0, np.int64),
                          np.zeros(0, np.int64), np.zeros((0, perms), np.uint32),
                          np.zeros((0, k), np.uint32))
        starts = chunk_starts(words, self.chunk_words)
        starts = starts[starts < shingles.size]
        minima = self.segment_minima(shingles, starts)
        distinct = sorted_unique(shingles)
        bottom = _padded(distinct[:k], k)
        if starts.size == 1:
            return Sketch(int(words.size), int(distinct.size), minima[0], bottom,
                          np.zeros(0, np.int64), np.zeros(0, np.int64),
                          np.zeros((0, perms), np.uint32), np.zeros((0, k), np.uint32))
        lengths = np.diff(np.append(starts, shingles.size))
        chunk = np.repeat(np.arange(starts.size, dtype=np.uint64), lengths)
        keyed = sorted_unique((chunk << U64(32)) | shingles)  # distinct (chunk, value)
        sizes = np.bincount((keyed >> U64(32)).astype(np.int64), minlength=starts.size)
        first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        take = np.arange(k)
        index = np.minimum(first[:, None] + take[None, :], keyed.size - 1)
        bottoms = np.where(take[None, :] < sizes[:, None],
                           (keyed[index] & U64(0xFFFFFFFF)).astype(np.uint32), SENTINEL32)
        return Sketch(int(words.size), int(distinct.size), minima.min(axis=0), bottom,
                      np.diff(np.append(starts, words.size)), sizes.astype(np.int64),
                      minima, bottoms.astype(np.uint32))

    def signature(self, text: str) -> np.ndarray:
        """Whole-document MinHash signature only."""
        shingles = (shingle_hashes(word_hashes(text), self.shingle_words)
                    >> U64(32)).astype(np.uint32)
        if shingles.size == 0:
            return np.full(self.num_perm, SENTINEL32, dtype=np.uint32)
        return self.segment_minima(shingles, np.zeros(1, dtype=np.int64))[0]

    def segment_minima(self, x: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """(len(starts), num_perm) uint32: min over each segment [starts[i], starts[i+1])."""
        m, block = x.size, self.block
        bounds = np.union1d(starts, np.arange(0, m, block, dtype=np.int64))
        pieces = []
        for lo in range(0, m, block):
            hi = min(lo + block, m)
            permuted = np.multiply.outer(self.a, x[lo:hi])  # (num_perm, block)
            permuted += self.b[:, None]
            local = bounds[np.searchsorted(bounds, lo): np.searchsorted(bounds, hi)] - lo
            pieces.append(np.minimum.reduceat(permuted, local, axis=1))
        minima = np.concatenate(pieces, axis=1) if len(pieces) > 1 else pieces[0]
        minima = np.minimum.reduceat(minima, np.searchsorted(bounds, starts), axis=1)
        return np.ascontiguousarray(minima.T)


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique for integer arrays, by sorting (numpy 2's hash-based unique is slower)."""
    out = np.sort(values)
    if out.size > 1:
        out = out[np.concatenate([[True], out[1:] != out[:-1]])]
    return out


def _padded(values: np.ndarray, k: int) -> np.ndarray:
    out = np.full(k, SENTINEL32, dtype=np.uint32)
    out[: values.size] = values
    return out


def exact_key(text: str) -> bytes:
    """16-byte hash of the text with every run of whitespace made one space (case kept)."""
    return xxhash.xxh3_128_digest(" ".join(text.split()).encode("utf-8"))


# ---------------------------------------------------------------- LSH


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(items, bands) uint64: one hash per band of `rows` signature values."""
    if bands * rows > signatures.shape[1]:
        raise ValueError(f"bands x rows = {bands * rows} exceeds the {signatures.shape[1]} "
                         "signature values")
    sig = signatures[:, : bands * rows].astype(np.uint64).reshape(-1, bands, rows)
    keys = np.zeros(sig.shape[:2], dtype=np.uint64)
    for r in range(rows):
        keys = mix64(keys + sig[:, :, r] * _SHINGLE_MULT[r])
    keys += np.arange(bands, dtype=np.uint64) * _LEN_MULT  # a band's keys never meet another's
    return keys


def candidate_pairs(keys: np.ndarray, full_bucket: int = 64, window: int = 8) -> np.ndarray:
    """(pairs, 2) int64 item pairs (i < j, unique, sorted) that share a band key.

    A bucket of up to `full_bucket` items gives all its pairs; a larger one (boilerplate
    shared by many items) links each item to the `window` items before it in index order
    and to the first one, so its cost stays linear while every item can still be verified
    against several others.
    """
    n, bands = keys.shape
    out = [np.zeros((0, 2), dtype=np.int64)]
    for band in range(bands):
        order = np.argsort(keys[:, band], kind="stable")
        k = keys[order, band]
        starts = np.flatnonzero(np.concatenate([[True], k[1:] != k[:-1]]))
        lengths = np.diff(np.append(starts, n))
        two = starts[lengths == 2]  # the common case, all at once
        out.append(np.stack([order[two], order[two + 1]], axis=1))
        for start, length in zip(starts[lengths > 2].tolist(), lengths[lengths > 2].tolist(),
                                 strict=True):
            group = np.sort(order[start: start + length])
            if length <= full_bucket:
                i, j = np.triu_indices(length, 1)
            else:
                i = np.concatenate([np.arange(max(0, t - window), t) for t in range(1, length)]
                                   + [np.zeros(length - 1, dtype=np.int64)])
                j = np.concatenate([np.full(min(t, window), t) for t in range(1, length)]
                                   + [np.arange(1, length)])
            out.append(np.stack([group[i], group[j]], axis=1))
    pairs = np.sort(np.concatenate(out).astype(np.int64), axis=1)
    return np.unique(pairs, axis=0)


def bottomk_jaccard(bottoms: np.ndarray, sizes: np.ndarray, pairs: np.ndarray,
                    batch: int = 2048) -> np.ndarray:
    """Jaccard estimate of each pair from bottom-k sketches (exact below k shingles each).

    The k smallest values of the union of two sketches are the k smallest of the union of
    the two sets; the fraction of them found in both sketches estimates the Jaccard index.
    Vectorized: each pair's two sketches are merged by one sort, a value in both shows up
    twice in a row.
    """
    k = bottoms.shape[1]
    out = np.zeros(len(pairs), dtype=np.float64)
    for lo in range(0, len(pairs), batch):
        p = pairs[lo: lo + batch]
        merged = np.sort(np.concatenate([bottoms[p[:, 0]], bottoms[p[:, 1]]], axis=1), axis=1)
        real = merged != SENTINEL32
        twice = np.zeros_like(real)
        twice[:, 1:] = (merged[:, 1:] == merged[:, :-1]) & real[:, 1:]
        first = real & ~twice  # each distinct value of the union, once
        in_bottom = np.cumsum(first, axis=1) <= k  # among the k smallest of the union
        union = (first & in_bottom).sum(axis=1)
        both = (twice & in_bottom).sum(axis=1)
        out[lo: lo + batch] = both / np.maximum(union, 1)
    return out


def jaccard_estimates(signatures: np.ndarray, pairs: np.ndarray,
                      batch: int = 65536) -> np.ndarray:
    """Fraction of equal signature values for each pair (the MinHash Jaccard estimate)."""
    out = np.empty(len(pairs), dtype=np.float64)
    for lo in range(0, len(pairs), batch):
        p = pairs[lo: lo + batch]
        out[lo: lo + batch] = (signatures[p[:, 0]] == signatures[p[:, 1]]).mean(axis=1)
    return out


# ---------------------------------------------------------------- pairs of documents

SIMILAR, CONTAINED = 0, 1  # edge kinds: near-duplicates; the first contained in the second
SIZE_RATIO = 0.8  # verified documents at least this close in size are similar, else contained


def similar_pairs(table: dict[str, np.ndarray], active: np.ndarray, bands: int, rows: int,
                  threshold: float, chunk_threshold: float, chunk_coverage: float,
                  stats: dict | None = None) -> dict[str, np.ndarray]:
    """Verified edges between documents of a sketch table (see `Sketch`, stacked).

    Whole documents: LSH candidates whose Jaccard estimate (bottom-k) reaches `threshold`
    are SIMILAR; with `threshold` 0 every candidate is accepted, as FineWeb does. Chunks:
    LSH over the chunks of chunked documents and the whole of the others; a chunk pair
    whose estimate reaches `chunk_threshold` matches. When the matched chunks of x cover at
    least `chunk_coverage` of x's words, x is CONTAINED in y, or SIMILAR to y when the
    reverse holds too. Returns arrays a, b, kind, score (a < b for SIMILAR); counts go to
    `stats`.
    """
    stats = {} if stats is None else stats
    docs = np.flatnonzero(active & (table["size"] > 0))
    edges = [_doc_edges(table, docs, bands, rows, threshold, chunk_coverage, stats)]
    if chunk_coverage > 0 and table["chunk_doc"].size:
        edges.append(_chunk_edges(table, active, bands, rows, chunk_threshold,
                                  chunk_coverage, stats))
    return {key: np.concatenate([e[key] for e in edges]) for key in ("a", "b", "kind", "score")}


def _edges(a: np.ndarray, b: np.ndarray, kind: np.ndarray, score: np.ndarray) -> dict:
    return {"a": a.astype(np.int64), "b": b.astype(np.int64), "kind": kind.astype(np.int8),
            "score": score.astype(np.float64)}


def _doc_edges(table: dict, docs: np.ndarray, bands: int, rows: int, threshold: float,
               coverage: float, stats: dict) -> dict:
    """Verified whole-document pairs. A pair of very different sizes (the smaller under
    SIZE_RATIO of the larger) is the smaller one CONTAINED in the larger when at least
    `coverage` of it lies there, never SIMILAR: a union of similar pairs would otherwise let
    a book stand for a longer file that holds it and more."""
    pairs = docs[candidate_pairs(band_keys(table["signature"][docs], bands, rows))]
    stats["candidate_pairs"] = len(pairs)
    if threshold <= 0:  # FineWeb: every candidate is a duplicate
        score = jaccard_estimates(table["signature"], pairs)
        stats["verified_pairs"] = len(pairs)
        return _edges(pairs[:, 0], pairs[:, 1], np.full(len(pairs), SIMILAR), score)
    score = bottomk_jaccard(table["bottom"], table["size"], pairs)
    pairs, score = pairs[score >= threshold], score[score >= threshold]
    stats["verified_pairs"] = len(pairs)
    size = table["size"][pairs].astype(np.float64)
    small = np.argmin(size, axis=1)
    ratio = size.min(axis=1) / np.maximum(size.max(axis=1), 1)
    inside = np.minimum(1.0, score * (1 + 1 / np.maximum(ratio, 1e-9)) / (1 + score))
    similar = ratio >= SIZE_RATIO
    contained = ~similar & (inside >= coverage) if coverage > 0 else np.zeros_like(similar)
    rows_ = np.arange(len(pairs))
    return _edges(
        np.concatenate([pairs[similar, 0], pairs[rows_[contained], small[contained]]]),
        np.concatenate([pairs[similar, 1], pairs[rows_[contained], 1 - small[contained]]]),
        np.concatenate([np.full(similar.sum(), SIMILAR), np.full(contained.sum(), CONTAINED)]),
        np.concatenate([score[similar], inside[contained]]),
    )


def _chunk_edges(table: dict, active: np.ndarray, bands: int, rows: int, threshold: float,
                 coverage: float, stats: dict) -> dict:
    chunk_doc = table["chunk_doc"]
    chunked = np.zeros(active.size, dtype=bool)
    chunked[chunk_doc] = True
    rows_c = np.flatnonzero(active[chunk_doc])
    whole = np.flatnonzero(active & ~chunked & (table["size"] > 0))
    item_doc = np.concatenate([chunk_doc[rows_c], whole])
    item_words = np.concatenate([table["chunk_words"][rows_c], table["words"][whole]])
    signatures = np.concatenate([table["chunk_signature"][rows_c], table["signature"][whole]])
    bottoms = np.concatenate([table["chunk_bottom"][rows_c], table["bottom"][whole]])
    sizes = np.concatenate([table["chunk_size"][rows_c], table["size"][whole]])
    pairs = candidate_pairs(band_keys(signatures, bands, rows))
    da, db = item_doc[pairs[:, 0]], item_doc[pairs[:, 1]]
    keep = (da != db) & (chunked[da] | chunked[db])  # whole-whole pairs: _doc_edges' job
    pairs = pairs[keep]
    stats["chunk_items"] = len(item_doc)
    stats["chunk_candidate_pairs"] = len(pairs)
    score = bottomk_jaccard(bottoms, sizes, pairs)
    pairs, score = pairs[score >= threshold], score[score >= threshold]
    stats["chunk_verified_pairs"] = len(pairs)
    empty = _edges(*(np.zeros(0),) * 4)
    if not len(pairs):
        return empty
    # How much of item x lies in item y: |x & y| / |x|, from J and the two set sizes.
    x = np.concatenate([pairs[:, 0], pairs[:, 1]])
    y = np.concatenate([pairs[:, 1], pairs[:, 0]])
    jac = np.concatenate([score, score])
    inside = np.minimum(1.0, jac * (sizes[x] + sizes[y]) / ((1 + jac) * np.maximum(sizes[x], 1)))
    # an item split over several items of the other document adds up its parts (at most 1)
    keys, inverse = np.unique(np.stack([item_doc[x], item_doc[y], x], axis=1), axis=0,
                              return_inverse=True)
    part = np.minimum(1.0, np.bincount(inverse.ravel(), weights=inside))
    directed, inverse = np.unique(keys[:, :2], axis=0, return_inverse=True)
    covered = np.bincount(inverse.ravel(), weights=part * item_words[keys[:, 2]])
    cov = covered / np.maximum(table["words"][directed[:, 0]], 1)
    lookup = {(int(p), int(q)): float(c) for (p, q), c in zip(directed, cov, strict=True)}
    a, b, kind, score_out = [], [], [], []
    for (p, q), c in sorted(lookup.items()):
        back = lookup.get((q, p), 0.0)
        if c >= coverage and back >= coverage:
            if p < q:
                a.append(p), b.append(q), kind.append(SIMILAR), score_out.append(min(c, back))
        elif c >= coverage:
            a.append(p), b.append(q), kind.append(CONTAINED), score_out.append(c)
    stats["chunk_edges"] = len(a)
    if not a:
        return empty
    return _edges(np.array(a), np.array(b), np.array(kind), np.array(score_out))


def empty_table(num_perm: int, bottom_k: int) -> dict[str, np.ndarray]:
    """The table of no document."""
    none = np.zeros(0, dtype=np.int64)
    return {"words": none, "size": none, "signature": np.zeros((0, num_perm), np.uint32),
            "bottom": np.zeros((0, bottom_k), np.uint32), "chunk_doc": none,
            "chunk_words": none, "chunk_size": none,
            "chunk_signature": np.zeros((0, num_perm), np.uint32),
            "chunk_bottom": np.zeros((0, bottom_k), np.uint32)}


def stack_sketches(sketches: list[Sketch]) -> dict[str, np.ndarray]:
    """Sketches of consecutive documents (at least one) as the arrays `similar_pairs` reads."""
    chunk_doc = np.concatenate([np.full(s.chunk_words.size, i, dtype=np.int64)
                                for i, s in enumerate(sketches)])
    return {
        "words": np.array([s.words for s in sketches], dtype=np.int64),
        "size": np.array([s.size for s in sketches], dtype=np.int64),
        "signature": np.stack([s.signature for s in sketches]),
        "bottom": np.stack([s.bottom for s in sketches]),
        "chunk_doc": chunk_doc,
        "chunk_words": np.concatenate([s.chunk_words for s in sketches]),
        "chunk_size": np.concatenate([s.chunk_sizes for s in sketches]),
        "chunk_signature": np.concatenate([s.chunk_signatures for s in sketches]),
        "chunk_bottom": np.concatenate([s.chunk_bottoms for s in sketches]),
    }
