"""Helpers shared by the tests (importable because pytest puts ``tests`` on ``pythonpath``)."""


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def assert_same_outputs(got, expected, tolerance=1e-6):
    """``got`` equal to ``expected`` (a tensor, or nested tuples of tensors) in structure,
    shapes and values, to ``tolerance``."""
    import torch

    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    else:
        assert isinstance(got, tuple) and len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            assert_same_outputs(g, e, tolerance)


def assert_converts_back(reference, unpacked):
    """``unpacked.to_torch()`` (in eval mode) is a module of ``reference``'s type, mode,
    options and parameter values."""
    import torch

    back = unpacked.eval().to_torch()
    assert type(back) is type(reference) and not back.training
    for name, value in reference.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    assert repr(back) == repr(reference)
