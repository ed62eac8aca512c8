import pytest

from flowdppo.core.steps import StepSelection


def test_random_steps_in_first_half_and_reproducible():
    sel = StepSelection()
    seen = set()
    for it in range(50):
        steps = sel.select(10, seed=42, iteration=it)
        assert len(steps) == 3 and len(set(steps)) == 3 and steps == sorted(steps)
        assert all(0 <= k < 5 for k in steps)
        assert steps == StepSelection().select(10, seed=42, iteration=it)  # a resumed run draws the same
        seen.add(tuple(steps))
    assert len(seen) > 5  # it does vary across iterations
    assert sel.select(14, 0, 0) and all(k < 7 for k in sel.select(14, 0, 3))


def test_window_and_fraction():
    w = StepSelection(strategy="window", num_sde_steps=2, end=0.6, window_every=2)
    assert w.select(10, 0, 0) == [0, 1] and w.select(10, 0, 2) == [1, 2] and w.select(10, 0, 10) == [0, 1]
    assert StepSelection(strategy="fraction", end=0.99).select(10, 0, 0) == list(range(9))


def test_errors():
    with pytest.raises(ValueError, match="valid"):
        StepSelection(strategy="all")
    with pytest.raises(ValueError, match="exceeds"):
        StepSelection(num_sde_steps=6).select(10, 0, 0)
    with pytest.raises(ValueError, match="start"):
        StepSelection(start=0.6, end=0.5)
