"""No measurement beside a training: the gate between processes of one machine."""

import multiprocessing
import time

from nas.search.core_gate import CoreGate

FORK = multiprocessing.get_context("fork")


def _measure(folder, started, done):
    gate = CoreGate(folder)
    with gate.measuring():
        started.set()
        time.sleep(0.5)
        done.set()  # inside: whoever gets in next sees it set


def _train_one_step(folder, stepped):
    gate = CoreGate(folder)
    gate.step()
    stepped.set()
    gate.done()


def test_a_training_step_waits_for_a_measurement(tmp_path):
    started, done, stepped = FORK.Event(), FORK.Event(), FORK.Event()
    measurer = FORK.Process(target=_measure, args=(tmp_path, started, done))
    measurer.start()
    assert started.wait(30)
    trainer = FORK.Process(target=_train_one_step, args=(tmp_path, stepped))
    trainer.start()
    assert stepped.wait(30)
    assert done.is_set()  # the step began only once the measurement had ended
    for p in (measurer, trainer):
        p.join(30)


def test_a_measurement_waits_for_the_step_in_flight_and_then_goes_first(tmp_path):
    gate = CoreGate(tmp_path)
    gate.step()  # this process is training a step
    started, done = FORK.Event(), FORK.Event()
    measurer = FORK.Process(target=_measure, args=(tmp_path, started, done))
    measurer.start()
    assert not started.wait(0.5)  # not beside the step in flight
    before = gate.waited_s
    gate.step()  # the next step: the queued measurement goes first
    assert started.is_set() and done.is_set()
    assert gate.waited_s - before >= 0.49  # held back for the whole 0.5 s measurement
    gate.done()
    measurer.join(30)


def test_a_killed_measurer_blocks_nobody(tmp_path):
    started, done, stepped = FORK.Event(), FORK.Event(), FORK.Event()
    measurer = FORK.Process(target=_measure, args=(tmp_path, started, done))
    measurer.start()
    assert started.wait(30)
    measurer.kill()
    measurer.join(30)
    _train_one_step(tmp_path, stepped)
    assert stepped.is_set() and not done.is_set()
