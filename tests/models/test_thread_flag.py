"""``models.thread_flag.ThreadFlag``: on only inside its block, on the thread that entered it; nested blocks."""

from __future__ import annotations

import threading

from models.thread_flag import ThreadFlag


def test_flag_is_on_only_inside_its_block_and_only_on_its_thread():
    flag = ThreadFlag()
    seen_elsewhere = []
    assert not flag
    with flag.on():
        assert flag
        other = threading.Thread(target=lambda: seen_elsewhere.append(bool(flag)))
        other.start()
        other.join()
        with flag.on():
            assert flag
        assert flag  # leaving the inner block keeps the outer one on
    assert not flag
    assert seen_elsewhere == [False]
