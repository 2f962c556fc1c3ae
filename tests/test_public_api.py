"""What `import cure_hf` offers: the names the README and the recipes use are importable from the package."""

import cure_hf
import cure_hf.data


def test_set_preprocessing_is_exported_from_the_package():
    from cure_hf import set_preprocessing

    assert set_preprocessing is cure_hf.data.set_preprocessing
    assert "set_preprocessing" in cure_hf.__all__


def test_every_name_in_all_is_importable():
    missing = [name for name in cure_hf.__all__ if not hasattr(cure_hf, name)]
    assert missing == []
