"""Class text embeddings: the prompt ensemble, template sets and files, and names as data sets hold them."""

import numpy as np
import pytest

from raylt.config import BackboneConfig
from raylt.embed.class_text import check_templates, class_text_embeddings, clean_name, templates
from raylt.errors import ConfigError


def test_the_prompt_ensemble_is_open_clips_zero_shot_classifier_on_the_tiny_model():
    import open_clip

    from raylt.embed.backbones import build_encoder

    enc = build_encoder(BackboneConfig(name="open_clip", model="raylt-tiny-vit", pretrained=None, offline=True))
    names = ["/a/abbey", "/a/apartment_building/outdoor", "n01440764 tench", "golden_retriever"]
    prompts = templates("simple")
    ours = class_text_embeddings(lambda t: enc.encode_text(t).numpy(), names, prompts, batch=5)
    ref = open_clip.build_zero_shot_classifier(enc.model, open_clip.get_tokenizer("raylt-tiny-vit"),
                                               [clean_name(n) for n in names], prompts, num_classes_per_batch=3)
    assert ours.shape == (4, enc.dim) and np.allclose(ours, ref.T.numpy(), atol=1e-5)
    assert len(prompts) == 7


@pytest.mark.parametrize("raw, clean", [
    ("/a/abbey", "abbey"),
    ("/a/apartment_building/outdoor", "apartment building (outdoor)"),
    ("n01440764 tench, Tinca tinca", "tench"),
    ("00042_Danaus_plexippus", "Danaus plexippus"),
    ("12 golden retriever", "golden retriever"),
    ("volcano", "volcano"),
])
def test_class_names_are_cleaned_as_captions_say_them(raw, clean):
    assert clean_name(raw) == clean


def test_a_file_of_templates_is_read_and_a_bad_one_refused_in_one_line(tmp_path):
    good = tmp_path / "prompts.txt"
    good.write_text("# my prompts\na satellite photo of {}.\n\nan aerial view of the {}.\n")
    assert [p("farm") for p in templates(str(good))] == ["a satellite photo of farm.", "an aerial view of the farm."]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of {}.\na photo.\n")
    with pytest.raises(ConfigError, match=r"bad.txt line 2: 'a photo.' needs exactly one \{\}"):
        check_templates(str(bad))
    with pytest.raises(ConfigError, match="missing.txt does not exist"):
        check_templates(str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match=r"unknown text template set 'scene' \(did you mean 'scenes'\?\)"):
        check_templates("scene")
    assert [p("abbey") for p in templates("scenes")][0] == "a photo of a abbey."


def test_class_text_brought_by_the_user_is_averaged_per_label_and_checked(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylt.embed.class_text import read_class_text
    from raylt.errors import DataError

    names = ["abbey", "alley", "arch"]
    rows = np.eye(4)[[0, 1, 1, 2]] * [[1], [1], [3], [2]]  # alley's two rows: the same direction, other norms
    rows[2, 3] = 3.0  # ... and then a different one: the average of the unit rows, renormalised
    write = lambda labels, emb, name="t.parquet": pq.write_table(  # noqa: E731
        pa.table({"label": labels, "embedding": [list(map(float, r)) for r in emb]}), tmp_path / name) or tmp_path / name
    got = read_class_text(write(["abbey", "alley", "alley", "arch"], rows), names, 4)
    assert np.array_equal(read_class_text(write([0, 1, 1, 2], rows), names, 4), got)  # or class indices
    want_alley = np.array([0, 1, 0, 0]) + np.array([0, 1, 0, 1]) / np.sqrt(2)
    assert np.allclose(got[1], want_alley / np.linalg.norm(want_alley)) and np.allclose(got[[0, 2]], np.eye(4)[[0, 2]])
    with pytest.raises(DataError, match="label 'aisle' is not a class of the embeddings"):
        read_class_text(write(["abbey", "aisle", "alley", "arch"], rows), names, 4)
    with pytest.raises(DataError, match="has no row for class 'arch'"):
        read_class_text(write(["abbey", "alley", "alley", "alley"], rows), names, 4)
    with pytest.raises(DataError, match="shape \\(4, 4\\); the image embeddings have D=8"):
        read_class_text(write(names + ["abbey"], rows), names, 8)
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="x.parquet: .*give a Parquet file with `label` and `embedding` columns"):
        read_class_text(tmp_path / "x.parquet", names, 4)
