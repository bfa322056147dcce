"""Helpers shared by the tests (importable because pytest puts ``tests`` on ``pythonpath``)."""


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]
