"""Last words: a surviving rank saves the last completed step while its training thread
waits in an all-reduce that a dead peer will never join (workloads/volo/last_words.py).
The MindSpore side is exercised by the fault suite (tests/faults/test_faults_volo.py);
here the protocol with the agent, on plain numpy state and probe processes."""

import sys
import threading
import time

import numpy as np

from launcher.agent import NodeAgent
from launcher.contract import LAST_WORDS_ENV, LastWordsExit
from launcher.ranks import RankSpec
from workloads.volo.last_words import LastWords


def _wait(pred, timeout=10.0):
    deadline = time.time() + timeout
    while not pred():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_saves_the_state_of_the_step_the_training_thread_waits_after(tmp_path):
    w = np.arange(6, dtype=np.float32)
    said, exits = [], []
    lw = LastWords(tmp_path / "r0.last-words", lambda step, snap: said.append((step, snap)),
                   print, poll_seconds=0.01, exit=exits.append)
    lw.arm([("w", "Float32", w)])
    assert (tmp_path / "r0.last-words.armed").exists()
    stuck = threading.Event()

    def training_thread():
        with lw.reducing(7):  # the all-reduce of step 8, which never returns
            stuck.wait(5)
        w[:] = -1.0  # the update, launched only once the wait is over

    t = threading.Thread(target=training_thread)
    t.start()
    (tmp_path / "r0.last-words").touch()
    _wait(lambda: exits)
    stuck.set()
    t.join()
    assert exits == [LastWordsExit.SAID]
    [(step, snap)] = said
    assert step == 7 and snap[0][:2] == ("w", "Float32")
    assert snap[0][2].tolist() == list(range(6))  # a copy: the later update did not reach it


def test_declines_when_the_training_thread_is_not_in_an_all_reduce(tmp_path):
    said, exits, logged = [], [], []
    lw = LastWords(tmp_path / "r0.last-words", lambda *a: said.append(a), logged.append,
                   poll_seconds=0.01, wait_seconds=0.3, exit=exits.append)
    lw.arm([("w", "Float32", np.zeros(2, np.float32))])
    (tmp_path / "r0.last-words").touch()
    _wait(lambda: exits)
    assert exits == [LastWordsExit.DECLINED] and said == []
    assert "not waiting in an all-reduce" in logged[0]


def test_a_failed_save_is_declined_and_said_why(tmp_path):
    def boom(step, snap):
        raise OSError("No space left on device")

    exits, logged = [], []
    lw = LastWords(tmp_path / "r0.last-words", boom, logged.append, poll_seconds=0.01,
                   exit=exits.append)
    lw.arm([("w", "Float32", np.zeros(2, np.float32))])
    with lw.reducing(3):
        (tmp_path / "r0.last-words").touch()
        _wait(lambda: exits)
    assert exits == [LastWordsExit.DECLINED] and "No space left on device" in logged[0]


PROBE = """
import os, sys, time
from pathlib import Path
req = Path(os.environ["FLEET_LAST_WORDS"])
if sys.argv[1] == "fail":
    time.sleep(1.0)
    sys.exit(3)
if sys.argv[1] == "unarmed":  # e.g. on an NPU: it never creates .armed
    time.sleep(30)
Path(str(req) + ".armed").touch()
while not req.exists():
    time.sleep(0.01)
Path(str(req) + ".said").touch()
sys.exit(0)
"""


def _rank(tmp_path, rank, mode):
    req = tmp_path / f"rank-{rank}.last-words"
    return RankSpec(rank, [sys.executable, "-c", PROBE, mode], {LAST_WORDS_ENV: str(req)},
                    str(tmp_path / f"rank-{rank}.log"), None, str(tmp_path)).to_dict()


def test_agent_asks_one_armed_survivor_that_is_not_stopped(tmp_path):
    import os
    import signal

    a = NodeAgent("j-lw", 1, 0)
    res = a.start([_rank(tmp_path, 0, "answer"), _rank(tmp_path, 1, "answer"),
                   _rank(tmp_path, 2, "fail")])
    _wait(lambda: all((tmp_path / f"rank-{r}.last-words.armed").exists() for r in (0, 1)))
    os.kill(res["pids"]["rank-0"], signal.SIGSTOP)  # a hung rank never answers
    _wait(lambda: a.poll()["status"] == "failed")
    r = a.poll()
    assert "rank-2 exited with exit code 3" in r["reason"]
    assert r["last_words"] == "rank-1"
    assert (tmp_path / "rank-1.last-words.said").exists()
    assert not (tmp_path / "rank-0.last-words").exists()  # asked once, not the stopped one
    assert r["exits"]["rank-1"] == 0
    a.stop()


def test_agent_asks_nobody_when_no_survivor_is_armed(tmp_path):
    a = NodeAgent("j-lw2", 1, 0)
    a.start([_rank(tmp_path, 0, "unarmed"), _rank(tmp_path, 1, "fail")])
    t0 = time.time()
    _wait(lambda: a.poll()["status"] == "failed")
    r = a.poll()
    assert "rank-1 exited with exit code 3" in r["reason"]  # rank 0 was alive to be asked
    assert r["last_words"] is None and time.time() - t0 < 5.0  # no wait for an answer
    assert not (tmp_path / "rank-0.last-words").exists()
    a.stop()


def test_rearming_after_a_disarm_announces_it_again(tmp_path):
    lw = LastWords(tmp_path / "r.last-words", lambda *a: None, print, exit=lambda c: None)
    views = [("w", "Float32", np.zeros(2, np.float32))]
    lw.arm(views)
    lw.disarm()
    assert not (tmp_path / "r.last-words.armed").exists()
    lw.arm(views)
    assert (tmp_path / "r.last-words.armed").exists()


class _Param:
    """The two things host_views reads of a MindSpore Parameter."""

    def __init__(self, name, arr, copies=False):
        self.name, self.dtype, self.arr, self.copies = name, "Float32", arr, copies

    def asnumpy(self):
        return self.arr.copy() if self.copies else self.arr  # device memory: a copy

    def data_ptr(self):
        return self.arr.ctypes.data


def test_views_only_where_parameters_live_in_host_memory(tmp_path):
    from workloads.volo.last_words import host_views

    p = _Param("w", np.ones(3, np.float32))
    views = host_views([p])
    assert views is not None and views[0][2] is p.arr
    assert host_views([_Param("w", np.ones(3, np.float32), copies=True)]) is None
    lw = LastWords(tmp_path / "r.last-words", lambda *a: None, print, exit=lambda c: None)
    lw.arm(views)
    assert lw.views_current([p])
    p.arr = np.zeros(3, np.float32)  # set_data: new storage, the views are stale
    assert not lw.views_current([p])
