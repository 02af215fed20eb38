"""Progress: a live bar on a terminal, a plain line every N seconds in a log, one duration estimate."""

import io

from ditforge.progress import Progress, format_duration


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_plain_lines_every_interval_and_one_estimate_when_not_a_terminal():
    clock, said, stream = Clock(), [], io.StringIO()
    p = Progress(100, 0, "train", said.append, stream=stream, interval_s=10.0, estimate_after=5, clock=clock)
    assert not p.tty and p.bar is None
    for _ in range(100):
        clock.t += 0.5  # 2 steps/s; the first step's time is not counted
        p.update()
    p.close()
    assert stream.getvalue() == ""  # no bar, no carriage returns
    estimates = [s for s in said if "over the first steps" in s]
    assert len(estimates) == 1
    assert "2.00 steps/s" in estimates[0] and "94 steps left, about 47 s" in estimates[0]
    lines = [s for s in said if s.startswith("train: step")]
    # 49.5 s of steps after the clock's start: a line at each 10 s mark, none at the end
    assert [l.split()[2] for l in lines] == ["20/100", "40/100", "60/100", "80/100"]
    assert "about 40 s left" in lines[0]


def test_a_terminal_gets_a_live_bar_and_the_estimate():
    clock, said, stream = Clock(), [], io.StringIO()
    p = Progress(20, 5, "train", said.append, stream=stream, tty=True, interval_s=1.0, estimate_after=3, clock=clock)
    for _ in range(15):
        clock.t += 2.0
        p.update()
    p.close()
    assert "\r" in stream.getvalue() and "20/20" in stream.getvalue()  # tqdm redrew in place
    assert not [s for s in said if s.startswith("train: step")]  # the bar replaces the plain lines
    assert len([s for s in said if "over the first steps" in s]) == 1


def test_format_duration():
    assert format_duration(42) == "42 s"
    assert format_duration(600) == "10.0 min"
    assert format_duration(7200) == "2.0 h"
