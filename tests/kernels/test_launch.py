"""The launchers' integer helpers agree with Triton's own (which cost more per call)."""
import triton

from meanflow.kernels.launch import cdiv, next_power_of_2


def test_cdiv_matches_triton():
    for numerator in range(0, 300):
        for denominator in (1, 2, 3, 7, 16, 64, 128):
            assert cdiv(numerator, denominator) == triton.cdiv(numerator, denominator)


def test_next_power_of_2_matches_triton():
    for n in range(1, 70000, 7):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
    for n in (1, 2, 3, 64, 65, 4096, 4097, 2**20):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
