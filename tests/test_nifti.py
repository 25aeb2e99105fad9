"""Synthetic NIfTI files: valid geometry, exact data round trip, no free-text header fields."""

import nibabel as nib
import numpy as np
import pytest

from raysynth.data.nifti import grid_affine, write_volume


@pytest.mark.parametrize("shape, spacing", [((16, 16, 16), (1.0, 1.0, 1.0)), ((8, 12, 10), (2.0, 1.5, 3.0))])
def test_round_trip_header_and_data(tmp_path, shape, spacing):
    vol = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    path = tmp_path / "v.nii.gz"
    write_volume(path, vol, spacing)
    img = nib.load(path)
    np.testing.assert_array_equal(np.asarray(img.dataobj), vol)
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.header.get_zooms(), spacing)
    np.testing.assert_allclose(img.affine, grid_affine(shape, spacing))
    assert int(img.header["qform_code"]) > 0 and int(img.header["sform_code"]) > 0
    np.testing.assert_allclose(img.get_qform(), img.get_sform())
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    # The volume's centre maps to the origin.
    centre = (np.asarray(shape) - 1) / 2.0
    np.testing.assert_allclose(nib.affines.apply_affine(img.affine, centre), 0.0, atol=1e-9)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left behind


def test_masks_are_uint8_label_maps(tmp_path):
    mask = np.random.default_rng(1).integers(0, 5, (8, 8, 8)).astype(np.uint8)
    write_volume(tmp_path / "m.nii.gz", mask, (1, 1, 1), is_mask=True)
    img = nib.load(tmp_path / "m.nii.gz")
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), mask)


def test_every_free_text_field_is_blank(tmp_path):
    write_volume(tmp_path / "v.nii.gz", np.zeros((4, 4, 4)), (1, 1, 1))
    hdr = nib.load(tmp_path / "v.nii.gz").header
    for field in ("descrip", "aux_file", "db_name", "intent_name"):
        assert hdr[field].item() in (b"", ""), field
    assert len(hdr.extensions) == 0


def test_rejects_non_volumes(tmp_path):
    with pytest.raises(ValueError, match="expected a \\(D, H, W\\) volume"):
        write_volume(tmp_path / "x.nii.gz", np.zeros((4, 4)), (1, 1))


def test_multichannel_images_are_one_4d_file_with_channels_last(tmp_path):
    """The documented layout: (C, x, y, z) -> one file (x, y, z, c); C = 1 stays a 3D file."""
    vol = np.random.default_rng(2).uniform(-1, 1, (3, 8, 6, 4)).astype(np.float32)
    write_volume(tmp_path / "m.nii.gz", vol, (2.0, 2.0, 2.0))
    img = nib.load(tmp_path / "m.nii.gz")
    assert img.shape == (8, 6, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(np.asarray(img.dataobj)[..., c], vol[c])
    np.testing.assert_allclose(img.affine, grid_affine((8, 6, 4), (2.0, 2.0, 2.0)))
    write_volume(tmp_path / "g.nii.gz", vol[:1], (2.0, 2.0, 2.0))
    assert nib.load(tmp_path / "g.nii.gz").shape == (8, 6, 4)
    with pytest.raises(ValueError, match="volume"):
        write_volume(tmp_path / "bad.nii.gz", vol, (1.0,) * 3, is_mask=True)
