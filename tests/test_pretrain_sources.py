"""Named pretraining sources, including the unlabelled corpus (EyeDisease4 training images, TVHL patients)."""

from __future__ import annotations

import pytest

from visionfm.data.sources import is_named_source, resolve_named_source
from visionfm.data.unlabeled import DataError


def test_corpus_sources_resolve_to_the_images_of_their_modality(shared_data):
    eye = resolve_named_source("EyeDisease4:train", shared_data, "cfp")
    assert len(eye) == 2480 and {p.parent.name for p in eye} == {"cataract", "diabetic_retinopathy", "glaucoma",
                                                                  "normal"}
    assert not any("test" in p.parts for p in eye)  # the held-back split is never offered
    oct_files = resolve_named_source("TVHL:oct", shared_data, "oct")
    assert len(oct_files) == 703 and all(p.suffix == ".jpg" for p in oct_files)
    assert len(resolve_named_source("TVHL:cfp,EyeDisease4:train", shared_data, "fundus")) == 1028 + 2480
    assert is_named_source("EyeDisease4:train,TVHL:cfp,DRIVE:train")


def test_a_source_of_another_modality_is_refused_by_name(shared_data):
    with pytest.raises(DataError, match=r"EyeDisease4:train holds colour fundus.*--modality cfp"):
        resolve_named_source("EyeDisease4:train", shared_data, "oct")
    with pytest.raises(DataError, match=r"TVHL:oct .*--modality oct"):
        resolve_named_source("TVHL:oct", shared_data, "cfp")


def test_a_missing_corpus_folder_names_the_folder(tmp_path):
    with pytest.raises(DataError, match=r"TVHL:cfp: folder .*pretrain/cfp/TVHL-other-patients not found"):
        resolve_named_source("TVHL:cfp", tmp_path, "cfp")
