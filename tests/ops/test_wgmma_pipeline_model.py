"""The sparse-wgmma kernel's synchronisation protocol, model-checked on the CPU under random interleavings.

The producer and consumer loops of `vnm_wgmma.cuh` are transcribed statement by statement as Python generators
over a model of the primitives they use: mbarriers (arrival count, transaction count, phase, `try_wait.parity`),
cp.async copies that land after random delays with `cp.async.mbarrier.arrive.noinc` (an arrival once all of the
thread's copies so far have landed), the first producer thread's TMA load of the k-step's A records announced
with `mbarrier.expect_tx` and completing its bytes after a random delay, asynchronous wgmma groups that retire
after random delays (`wait_group 1`). A random scheduler runs them; the checks are the ones a wrong count or parity would break:
no deadlock, a wgmma only reads a stage whose copies for its k-step have all landed, and a copy never overwrites
a stage that a not-yet-retired wgmma reads. Run for every STAGES in the list and for k-step counts below, at and
above the ring size.
"""

from __future__ import annotations

import random

import pytest

from vnmsparse.ops import variants

PRODUCERS = 4  # producer threads modelled (the kernel has 128; each runs the same code)
WARPS_PER_WG = 4


class Barrier:
    def __init__(self, count: int):
        self.count, self.pending, self.phase = count, count, 0  # phase = completed phases
        self.tx = 0  # transaction bytes announced and not yet completed (may dip below 0: completions first)

    def arrive(self):
        self.pending -= 1
        assert self.pending >= 0
        self._maybe_complete()

    def expect_tx(self, n: int):
        self.tx += n

    def complete_tx(self, n: int):
        self.tx -= n
        self._maybe_complete()

    def _maybe_complete(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count

    def done(self, parity: int) -> bool:  # mbarrier.try_wait.parity: has the phase with this parity completed?
        return (self.phase & 1) != parity


class Machine:
    def __init__(self, stages: int, consumers: int, kc: int, rng: random.Random):
        self.stages, self.kc, self.rng = stages, kc, rng
        self.full = [Barrier(PRODUCERS) for _ in range(stages)]
        self.empty = [Barrier(WARPS_PER_WG * consumers) for _ in range(stages)]
        self.landed = {}  # (producer, k-step) -> landed?
        self.a_landed = {}  # k-step -> its A records landed (TMA)?
        self.stage_a_kstep = [None] * stages  # which k-step's A records a stage last received
        self.stage_kstep = [[None] * PRODUCERS for _ in range(stages)]  # which k-step each producer last wrote there
        self.readers = [set() for _ in range(stages)]  # in-flight wgmma (consumer, k-step) reading each stage
        self.events = []  # pending async completions: callables

    def later(self, fn):
        self.events.append(fn)


def producer(m: Machine, pid: int, early: bool = False, late_expect: bool = False):
    issued = []  # k-steps whose copies this thread has issued

    def arrive_on_copies(kc):  # cp.async.mbarrier.arrive.noinc: fires once all copies issued so far have landed
        def fire():
            if early or all(m.landed[(pid, k)] for k in issued[: issued.index(kc) + 1]):
                m.full[kc % m.stages].arrive()
            else:
                m.later(fire)
        m.later(fire)

    for kc in range(m.kc):
        s = kc % m.stages
        if kc >= m.stages:
            while not m.empty[s].done(((kc // m.stages) - 1) & 1):
                yield
        # the copies of this k-step: nobody may still be reading the stage
        assert not m.readers[s], f"producer {pid} overwrites stage {s} (k-step {kc}) under wgmma {m.readers[s]}"
        if pid == 0 and not late_expect:  # the A boxes, announced before this thread's own arrival below
            load_a(m, kc)
        m.stage_kstep[s][pid] = kc
        m.landed[(pid, kc)] = False
        issued.append(kc)
        m.later(lambda k=kc: m.landed.__setitem__((pid, k), True))
        arrive_on_copies(kc)
        yield
        if pid == 0 and late_expect:  # wrong order: the arrival may complete the phase before A is announced
            load_a(m, kc)
    while not all(m.landed[(pid, k)] for k in issued):  # cp.async.wait_all before the thread exits
        yield


def load_a(m: Machine, kc: int) -> None:
    """mbarrier.expect_tx on the stage's `full`, then the TMA boxes of the k-step's A, landing later."""
    s = kc % m.stages
    m.full[s].expect_tx(1)
    m.stage_a_kstep[s] = kc
    m.a_landed[kc] = False

    def land():
        m.a_landed[kc] = True
        m.full[s].complete_tx(1)

    m.later(land)


def consumer(m: Machine, cid: int):
    inflight = []  # k-steps of this warpgroup's committed wgmma groups not yet retired

    def retire(k):
        m.readers[k % m.stages].discard((cid, k))
        inflight.remove(k)

    for kc in range(m.kc):
        s = kc % m.stages
        while not m.full[s].done((kc // m.stages) & 1):
            yield
        for pid in range(PRODUCERS):  # what the wgmma reads must be this k-step's data, landed
            assert m.stage_kstep[s][pid] == kc and m.landed[(pid, kc)], f"consumer {cid} reads stage {s} for k-step {kc} too early"
        assert m.stage_a_kstep[s] == kc and m.a_landed[kc], f"consumer {cid} reads A of k-step {kc} too early"
        m.readers[s].add((cid, kc))
        inflight.append(kc)
        m.later(lambda k=kc: retire(k))
        while any(k < kc for k in inflight):  # wgmma.wait_group 1: all groups but the newest have retired
            yield
        if kc > 0:
            for _ in range(WARPS_PER_WG):  # lane 0 of each warp
                m.empty[(kc - 1) % m.stages].arrive()
        yield
    while inflight:  # wgmma.wait_group 0
        yield


class Stuck(Exception):
    """No agent can make progress: a deadlock."""


def run(stages: int, consumers: int, kc: int, seed: int, early: bool = False, late_expect: bool = False) -> None:
    rng = random.Random(seed)
    m = Machine(stages, consumers, kc, rng)
    agents = [producer(m, p, early, late_expect) for p in range(PRODUCERS)] + [consumer(m, c) for c in range(consumers)]
    for _ in range(5_000 + 3_000 * kc):
        if not agents and not m.events:
            return
        if m.events and (not agents or rng.random() < 0.3):  # an asynchronous copy or wgmma completes
            m.events.pop(rng.randrange(len(m.events)))()
            continue
        a = agents[rng.randrange(len(agents))]
        try:
            next(a)
        except StopIteration:
            agents.remove(a)
    raise Stuck(f"STAGES={stages} consumers={consumers} Kc={kc} seed={seed}")


STAGES = sorted({v.stages for v in variants.VARIANTS if isinstance(v, variants.Wgmma)})


@pytest.mark.parametrize("stages", STAGES)
@pytest.mark.parametrize("kc", [1, 2, 3, 7, 13])
def test_protocol_under_random_schedules(stages, kc):
    for seed in range(25):
        run(stages, 2, kc, seed * 1000 + stages * 10 + kc)


def test_an_arrival_before_the_copies_land_is_caught():
    # Teeth: a producer that arrives on `full` when it issues its copies (not when they land) lets a wgmma read
    # a stage too early; the model must see it.
    with pytest.raises(AssertionError, match="too early"):
        for seed in range(50):
            run(4, 2, 13, seed, early=True)


def test_a_transaction_announced_after_the_arrival_is_caught():
    # Teeth: announcing A's bytes only after the thread's copy arrival lets the phase complete without A.
    with pytest.raises(AssertionError, match="A of k-step"):
        for seed in range(50):
            run(4, 2, 13, seed, late_expect=True)


def test_the_model_catches_a_wrong_parity(monkeypatch):
    # Teeth: a producer that waits on the wrong `empty` parity overwrites a stage under a running wgmma.
    def bad_done(self, parity):
        return (self.phase & 1) == parity or self.phase > 0

    monkeypatch.setattr(Barrier, "done", bad_done)
    with pytest.raises(AssertionError):
        for seed in range(50):
            run(4, 2, 13, seed)
