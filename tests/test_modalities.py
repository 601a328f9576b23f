import pytest

from visionfm.modalities import MODALITIES, UnknownModalityError, get_modality


@pytest.mark.parametrize("alias, name", [("Fundus", "cfp"), ("fundus", "cfp"), ("CFP", "cfp"), ("OCT", "oct"),
                                         ("FFA", "ffa"), ("SlitLamp", "slitlamp"), ("External", "external"),
                                         ("UBM", "ubm"), ("UltraSound", "bscan"), ("MRI", "mri")])
def test_aliases_resolve_to_canonical_names(alias, name):
    assert get_modality(alias).name == name


def test_all_issue_modalities_are_registered():
    expected = {"cfp", "oct", "octa", "ffa", "faf", "icga", "uwf", "slitlamp", "external", "ubm", "bscan", "mri"}
    assert set(MODALITIES) == expected


def test_unknown_modality_lists_valid_ones():
    with pytest.raises(UnknownModalityError) as err:
        get_modality("xray")
    message = str(err.value)
    assert "xray" in message and all(name in message for name in MODALITIES)


def test_grey_modalities_never_solarise_or_shift_hue():
    for m in MODALITIES.values():
        assert len(m.mean) == len(m.std) == 3
        if m.is_grey:
            assert not m.augment.solarize and m.augment.hue == 0


def test_anatomy_with_up_and_down_is_not_flipped_vertically():
    for name in ("cfp", "oct", "bscan", "ubm", "external", "slitlamp"):
        assert not get_modality(name).augment.vflip, name


def test_visionfm_fundus_normalisation():
    m = get_modality("Fundus")
    assert m.mean == (0.424, 0.261, 0.128) and m.std == (0.295, 0.202, 0.137)
