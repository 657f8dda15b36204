import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Numba compiles on first use, so the first example of a test can be slow: no deadline.
settings.register_profile("npllama", deadline=None, max_examples=20,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("npllama")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
