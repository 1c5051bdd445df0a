"""benchmarks/bilevel.py's target verdict: both halves (speed and accuracy) at the same mu."""

from benchmarks import bilevel


def test_target_needs_both_halves_at_the_same_conditioning():
    speed = {
        1e-2: ((0.66, 0.61, 0.70), 0.52),  # too slow, and the inner solve alone is over 0.5
        1e-3: ((0.43, 0.40, 0.44), 0.32),  # fast enough
        1e-4: ((0.30, 0.28, 0.33), 0.20),  # fast enough, but less accurate
        1e-5: ((0.55, 0.50, 0.60), 0.40),  # too slow, though it could have been fast enough
    }
    accuracy = {1e-2: 0.2, 1e-3: -0.1, 1e-4: -1.3, 1e-5: 0.0}
    lines = bilevel.target_summary(speed, accuracy).splitlines()

    assert lines[0] == "### Target: both halves at the same mu"
    by_mu = {line.split(":")[0]: line for line in lines if line.startswith("- mu")}
    assert by_mu["- mu = 0.001"].endswith("test accuracy -0.1 points: met.")
    assert "0.66 [0.61–0.70] of CG's" in by_mu["- mu = 0.01"]
    assert "**missed**. Here the inner solve alone is 0.52 of CG's step" in by_mu["- mu = 0.01"]
    assert by_mu["- mu = 0.0001"].endswith("test accuracy -1.3 points: **missed**.")
    # The floor note appears only when the floor itself is over the target.
    assert by_mu["- mu = 1e-05"].endswith("test accuracy +0.0 points: **missed**.")
