"""Progress bars: the live tqdm bar on a terminal; in a file or a pipe, a bounded number of whole lines
(no carriage-return redraws), however many updates."""
import io
import re
import time

from tqdm.std import tqdm as std_tqdm

from retro.base.progress import LineProgress, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_fast_loop_writes_few_whole_lines_to_a_file():
    stream = io.StringIO()
    bar = progress_bar(total=400, desc="working", file=stream)
    for _ in range(400):  # about a second: a live bar redraws ~10 times (tqdm's mininterval, 0.1 s)
        time.sleep(0.0025)
        bar.set_postfix(loss="1.0")  # refreshes at every call in tqdm
        bar.update(1)
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text, repr(text[:200])
    lines = text.splitlines()
    assert 1 <= len(lines) <= 3, lines  # the start, the end (and at most one at 10 s on a slow machine)
    assert lines[-1].startswith("working") and "400/400" in lines[-1], lines


def test_an_iterable_and_a_quiet_bar():
    stream = io.StringIO()
    assert sum(progress_bar(range(1000), file=stream, mininterval=0)) == 499500
    assert len([line for line in re.split(r"[\r\n]", stream.getvalue()) if line]) <= 3  # mininterval is a floor
    quiet = io.StringIO()
    for _ in progress_bar(range(10), file=quiet, disable=True):
        pass
    with progress_bar(total=10, file=quiet, delay=5.0) as bar:  # closed before its delay: nothing written
        bar.update(10)
    assert quiet.getvalue() == ""


def test_a_terminal_gets_the_live_bar():
    bar = progress_bar(total=3, file=Terminal())
    assert isinstance(bar, std_tqdm) and not isinstance(bar, LineProgress)
    bar.close()
    assert isinstance(progress_bar(total=3, file=io.StringIO(), disable=True), LineProgress)
