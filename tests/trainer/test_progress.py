"""Progress in logs: whole lines (never carriage returns) at most every 10 s with the time left,
observers that hear every bar, and the demo build's overall line whose estimate is revised."""

from __future__ import annotations

import io

from trainer.demo.build_steps import BuildClock
from trainer.progress import LineProgress, Progress, clock, observe


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_clock() -> None:
    assert [clock(s) for s in (0, 59.6, 61, 3600 + 62)] == ["0:00", "1:00", "1:01", "1:01:02"]


def test_line_progress_writes_whole_lines_every_interval_and_at_the_end() -> None:
    out, now = io.StringIO(), FakeClock()
    bar = LineProgress(100, "distill", file=out, now=now, every_s=10)
    for _ in range(40):
        now.t += 0.5  # 40 steps in 20 s: two lines
        bar.update()
        bar.set_postfix(loss="0.5000")
    bar.close()
    bar.close()  # once only
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 3
    assert lines[0].startswith("distill: step 20/100 (20%), 0:10 elapsed, ~0:40 left")
    assert lines[-1] == "distill: step 40/100 (40%), 0:20 elapsed, ~0:30 left, loss=0.5000"


def test_progress_off_a_terminal_is_lines_and_observers_hear_it_even_when_disabled() -> None:
    heard: list[tuple[str, int, int]] = []
    out = io.StringIO()  # not a TTY
    with observe(lambda *event: heard.append(event)):
        shown = Progress(3, "teach-a", file=out)
        hidden = Progress(2, "teach-b", enabled=False, file=out)
        for bar in (shown, hidden):
            bar.update()
            bar.close()
    assert heard == [("teach-a", 1, 3), ("teach-b", 1, 2)]
    assert out.getvalue().splitlines()[0].startswith("teach-a: step 1/3 (33%), 0:00 elapsed")
    assert len(out.getvalue().splitlines()) == 1
    Progress(1, "after").update()  # no observer left: nothing to hear
    assert len(heard) == 2


def test_build_clock_revises_its_estimate_from_the_steps_it_sees() -> None:
    said: list[str] = []
    now = FakeClock()
    build = BuildClock(
        [("teach", 10, 1.0), ("distill", 10, 2.0)], every_s=30, say=said.append, now=now
    )
    assert build.estimate() == (0.0, 30.0)  # the priors: 10 x 1 s + 10 x 2 s
    now.t = 60.0  # loading the model took a minute: not training, not counted in the pace
    build("teach-a", 1, 10)
    assert said == ["build: 3% of the training steps done, 1:00 elapsed, about 0:29 left"]
    now.t = 78.0  # this machine is twice as slow: 9 more teach steps took 18 s, not 9
    build("teach-a", 10, 10)
    frac, left = build.estimate()
    assert round(frac, 3) == 0.333 and left == 40.0  # the 20 s of distill priors, doubled
    now.t = 91.0
    build("distill", 1, 10)
    assert said[-1] == "build: 40% of the training steps done, 1:31 elapsed, about 0:51 left"
    now.t = 95.0
    build("distill", 2, 10)  # within 30 s of the last line: nothing said
    build("pretrain", 5, 10)  # not a stage of this build: ignored
    assert len(said) == 2


def test_a_bar_that_counts_a_share_writes_only_the_share() -> None:
    out, now = io.StringIO(), FakeClock()
    bar = LineProgress(100, "pretrain-demo", file=out, now=now, unit="")
    now.t = 30.0
    bar.update(25)
    bar.close()
    assert out.getvalue().splitlines()[-1] == "pretrain-demo: 25%, 0:30 elapsed, ~1:30 left"
