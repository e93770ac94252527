"""Per-student channel scaling (BOC-KD: branch i keeps (N - i) / N of every stage's width)."""

from bockd.errors import ConfigError


def width_multiplier(index: int, num_students: int) -> float:
    """Nominal width of student ``index`` (0-based) relative to S1: 1, 4/5, ..., 1/5 for N = 5."""
    return (num_students - index) / num_students


def scaled_width(channels: int, index: int, num_students: int) -> int:
    """``floor(channels * (N - index) / N)`` in integer arithmetic, so no float rounding can shift a count."""
    width = channels * (num_students - index) // num_students
    if width < 1:
        raise ConfigError(
            f"num_students: {num_students} students leave S{index + 1} with 0 of {channels} channels; "
            f"expected num_students <= {channels} for this architecture"
        )
    return width
