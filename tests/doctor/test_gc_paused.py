import gc

import pytest
from adapter_doctor.gc_paused import gc_paused


def test_the_collector_comes_back_as_it_was_even_after_an_exception():
    assert gc.isenabled()
    with pytest.raises(ValueError), gc_paused():
        assert not gc.isenabled()
        raise ValueError
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # a caller that had paused it keeps it paused
    finally:
        gc.enable()
