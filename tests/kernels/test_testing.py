"""The test helpers themselves (testing.py): the error-ratio rule rejects an output just outside its
bound and accepts one just inside; the model-level check that tests/kernels/test_gpu.py runs on the GPU
(full forward and incremental decoding against the float64 model) runs here on the CPU kernels."""
import pytest
import torch

from tests.helpers.testing import assert_error_ratio, check_model_decoding, max_err, rounding_error


def test_error_ratio_rule_is_tight():
    torch.manual_seed(0)
    a = torch.randn(64, 32, dtype=torch.float64)
    b = torch.randn(32, 32, dtype=torch.float64)
    ref64, ref32 = a @ b, a.float() @ b.float()  # the product exactly and in float32
    bound = 4.0 * max_err(ref32, ref64) + rounding_error(ref64, torch.float32)
    assert bound > 0
    inside, outside = ref64.clone(), ref64.clone()
    inside[3, 5] += 0.9 * bound
    outside[3, 5] += 1.1 * bound
    assert_error_ratio("inside", inside.float(), ref32, ref64)
    with pytest.raises(AssertionError, match=r"outside: error .* > 4.0 x PyTorch torch.float32 error"):
        assert_error_ratio("outside", outside.float(), ref32, ref64)


def test_model_decoding_error_ratio_on_cpu():
    errors = check_model_decoding("cpu")
    for name, (err, ref_err, floor) in errors.items():
        assert 0 < ref_err and 0 < floor, (name, ref_err, floor)  # real rounding to compare against
        print(f"{name}: error {err:.3e}, PyTorch float32 {ref_err:.3e}, rounding floor {floor:.3e}")
