"""What the TF-IDF baseline reads of a row, and the most similar labelled examples by it (kNN demonstrations)."""

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics.pairwise import cosine_similarity
from sklearn.pipeline import FeatureUnion, make_union

from distilflow.configs.schema import TaskConfig
from distilflow.tasks import data


def texts(rows: list[dict], task: TaskConfig) -> list[str]:
    """What the classifier reads of a row: the user message a model reads, without the system prompt."""
    return [data.user_message(row, task) for row in rows]


def features() -> FeatureUnion:
    """TF-IDF of word 1-2 grams and of character 2-5 grams within words, sublinear term frequency."""
    return make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                      TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True))


def nearest(pool: list[dict], rows: list[dict], k: int, task: TaskConfig) -> list[tuple[dict, ...]]:
    """Each row's ``k`` most similar pool examples by the cosine of their TF-IDF features (fitted on the pool), the
    most similar last, nearest the row it precedes in a prompt. A row that is itself in the pool is not its own
    neighbour. Ties keep the pool's order."""
    vectorizer = features().fit(texts(pool, task))
    similarity = cosine_similarity(vectorizer.transform(texts(rows, task)), vectorizer.transform(texts(pool, task)))
    chosen = []
    for row, similarities in zip(rows, similarity):
        candidates = [i for i in np.argsort(-similarities, kind="stable") if pool[i] != row][:k]
        chosen.append(tuple(pool[i] for i in reversed(candidates)))
    return chosen
