import pytest
import torch

from gkpd import Calibration
from gkpd.bench.variants import VARIANTS, base_method, compress_options, needs_calibration


def test_a_method_is_its_own_base_and_needs_no_calibration():
    assert base_method("tucker") == "tucker"
    assert not needs_calibration("tucker")
    assert compress_options("tucker", None) == ("tucker", {})


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_variant_runs_its_method_with_its_pinned_options(name):
    method, pinned = VARIANTS[name]
    assert base_method(name) == method
    assert needs_calibration(name) == ("calibration" in pinned)
    images = torch.randn(4, 1, 8, 8)
    ran, options = compress_options(name, images)
    assert ran == method
    assert set(options) == set(pinned)
    if needs_calibration(name):
        calibration = options["calibration"]
        assert isinstance(calibration, Calibration)
        assert calibration.data is images
        assert calibration.settings() == {**calibration.settings(), **pinned["calibration"]}
        with pytest.raises(ValueError, match=f"method '{name}' needs calibration images"):
            compress_options(name, None)
    assert VARIANTS[name] == (method, pinned)  # the table itself is never changed
