"""Class text embeddings: each class's name through the backbone's text tower, over a set of
prompt templates, averaged per class and put back on the sphere, as open_clip's
`build_zero_shot_classifier` does (raylt.head.text uses them for the text prior and the
zero-shot ensemble).

Template sets (`head.text_templates`): `simple` (open_clip's 7 `SIMPLE_IMAGENET_TEMPLATES`,
the default), `openai` (its 80 `OPENAI_IMAGENET_TEMPLATES`), `scenes` and `species` (shipped here, for
place and for organism names), or a text file of templates, one per line, each with one `{}`
where the name goes. Names are cleaned as data sets hold them (`clean_name`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from raylt.choices import TEMPLATES  # declared there: names, help, this module
from raylt.errors import ConfigError

Template = Callable[[str], str]

_SCENES = ("a photo of a {}.", "a photo of the {}.", "a photo of a {}, a type of place.", "a blurry photo of a {}.",
           "a bright photo of a {}.", "a dark photo of a {}.", "a photo taken in a {}.", "a view of a {}.")
_SPECIES = ("a photo of a {}, a type of organism.", "a photo of the species {}.", "a close-up photo of a {}.",
            "a photo of a {} in the wild.", "a blurry photo of a {}.", "a nature photo of a {}.")


def _formatted(templates: Sequence[str]) -> list[Template]:
    return [t.format for t in templates]


@TEMPLATES.register("openai")
def _openai() -> list[Template]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES  # open_clip only where it is used

    return list(OPENAI_IMAGENET_TEMPLATES)


@TEMPLATES.register("simple")
def _simple() -> list[Template]:
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    return list(SIMPLE_IMAGENET_TEMPLATES)


TEMPLATES.register("scenes")(lambda: _formatted(_SCENES))
TEMPLATES.register("species")(lambda: _formatted(_SPECIES))


def is_template_file(value: str) -> bool:
    return "/" in value or value.endswith(".txt")


def check_templates(value: str) -> None:
    """A one-line ConfigError unless `value` is a template set's name or a readable file of
    templates, each with one `{}` (nothing heavy is imported)."""
    if not is_template_file(value):
        TEMPLATES.check(value)
        return
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"head.text_templates {path} does not exist; give a file of templates (one per line, "
                          f"each with {{}} for the class name) or one of: {', '.join(TEMPLATES.names())}")
    for i, line in enumerate(_lines(path), 1):
        if line.count("{}") != 1:
            raise ConfigError(f"head.text_templates {path} line {i}: {line!r} needs exactly one {{}} where the "
                              "class name goes")


def _lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def templates(value: str) -> list[Template]:
    """The templates `head.text_templates` names, as callables name -> prompt."""
    check_templates(value)
    if is_template_file(value):
        return _formatted(_lines(Path(value).expanduser()))
    return TEMPLATES.get(value)()


_WORDNET = re.compile(r"^n\d{8}\s+")  # ImageNet's "n01440764 tench"
_PLACES = re.compile(r"^/[a-z]/")  # Places' "/a/abbey", "/a/apartment_building/outdoor"
_NUMBERED = re.compile(r"^\d+[\s_.:-]+")  # "00123_name", "12 name"


def clean_name(raw: str) -> str:
    """A class name as a caption would say it: WordNet ids, Places keys and leading numbers
    dropped, underscores as spaces, a Places sub-type in parentheses ("apartment building
    (outdoor)"), several comma-separated synonyms cut to the first."""
    name = _NUMBERED.sub("", _WORDNET.sub("", raw.strip()))
    if _PLACES.match(name):
        parts = name[3:].split("/")
        name = parts[0] + (f" ({' '.join(parts[1:])})" if len(parts) > 1 else "")
    name = name.split(",")[0].replace("_", " ")
    return re.sub(r"\s+", " ", name).strip() or raw.strip()


def class_text_embeddings(encode_text: Callable[[list[str]], np.ndarray], names: Sequence[str],
                          prompts: Sequence[Template], batch: int = 256) -> np.ndarray:
    """[C, D] float32: per class, the mean of its prompts' unit text embeddings, renormalised.
    `encode_text(texts) -> [len(texts), D]` unit rows (a backbone's text tower)."""
    cleaned = [clean_name(n) for n in names]
    texts = [p(n) for n in cleaned for p in prompts]
    out = np.concatenate([np.asarray(encode_text(texts[s : s + batch]), np.float64)
                          for s in range(0, len(texts), batch)])
    out = out.reshape(len(cleaned), len(prompts), -1).mean(1)
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


CACHE_DIR = "class_text"  # in a store's folder: the store is keyed by its encoder, so these are too
CLASS_TEXT_FILE = "class_text.npy"  # a fit's copy, beside head.npz: [C, D] in the head's class order


def cached_class_text(store: Path | None, backbone: dict, names: Sequence[str], template_value: str,
                      compute: Callable[[list[Template]], np.ndarray]) -> tuple[np.ndarray, Path | None, bool]:
    """(class text [C, D], its file, whether it was reused): read from `<store>/class_text/<key>.npy`,
    the key hashing the backbone config, the prompts and the names, or `compute(prompts)`d and
    written there (atomically; a store folder that cannot be written only costs the cache).
    A damaged file is computed again, with a warning."""
    import logging
    import os

    from raylt.ops.hashing import json_key

    log = logging.getLogger(__name__)
    prompts = templates(template_value)
    key = json_key({"backbone": backbone, "prompts": [p("{}") for p in prompts], "names": list(names)})
    path = Path(store) / CACHE_DIR / f"{key}.npy" if store is not None else None
    if path is not None and path.is_file():
        try:
            text = np.load(path, allow_pickle=False)
            if text.shape[0] == len(names) and np.isfinite(text).all():
                return text, path, True
        except (OSError, ValueError) as e:
            log.warning("class text %s is damaged (%s); computing it again", path, str(e).splitlines()[0][:120])
        else:
            log.warning("class text %s does not fit %d classes; computing it again", path, len(names))
    text = compute(prompts)
    if path is not None:
        try:
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.save(f, text, allow_pickle=False)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("class text not cached in %s (%s): it is computed again next time", path.parent, e.strerror)
            path = None
    return text, path, False


def read_class_text(path, class_names: Sequence[str], dim: int) -> np.ndarray:
    """[C, D] class text from a Parquet file of `label` (a class index, or a class name as the
    embeddings name it) and `embedding` (D floats) rows, several rows of a label averaged and
    put back on the sphere (`raylt fit --class-text`): text embeddings brought by the user."""
    import pyarrow.parquet as pq

    from raylt.errors import DataError

    path = Path(path).expanduser()
    try:
        table = pq.read_table(path, columns=["label", "embedding"])
    except (OSError, ValueError, KeyError) as e:  # missing file, not Parquet, missing column
        raise DataError(f"--class-text {path}: {str(e).splitlines()[0][:160]}; give a Parquet file with `label` "
                        "and `embedding` columns") from None
    labels = table["label"].to_pylist()
    emb = np.asarray(table["embedding"].to_numpy(zero_copy_only=False).tolist(), np.float64)
    if emb.ndim != 2 or emb.shape[1] != dim:
        raise DataError(f"--class-text {path}: embeddings of shape {emb.shape}; the image embeddings have D={dim} "
                        "(text and images must come from the same CLIP model)")
    index = {n: i for i, n in enumerate(class_names)}
    rows = [lab if isinstance(lab, int) and 0 <= lab < len(class_names) else index.get(str(lab)) for lab in labels]
    unknown = [lab for lab, r in zip(labels, rows) if r is None]
    if unknown:
        raise DataError(f"--class-text {path}: label {unknown[0]!r} is not a class of the embeddings "
                        f"({len(unknown)} such rows); use the class names or indices the embeddings use")
    which = np.asarray(rows, np.int64)
    counts = np.bincount(which, minlength=len(class_names))
    if (counts == 0).any():
        missing = class_names[int(np.argmax(counts == 0))]
        raise DataError(f"--class-text {path} has no row for class {missing!r} ({int((counts == 0).sum())} classes "
                        "without one); every class needs a text embedding")
    sums = np.zeros((len(class_names), dim))
    np.add.at(sums, which, emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12))
    return (sums / np.linalg.norm(sums, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)
