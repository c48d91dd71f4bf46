"""The sparse-wgmma kernel's synchronisation protocol, model-checked on the CPU under random interleavings.

The producer and consumer loops of `vnm_wgmma.cuh` are transcribed statement by statement as Python generators
over a model of the primitives they use: mbarriers (arrival count, transaction count, phase, `try_wait.parity`),
cp.async copies that land after random delays with `cp.async.mbarrier.arrive.noinc` (an arrival once all of the
thread's copies so far have landed), the first producer thread's TMA load of the k-step's A records announced
with `mbarrier.expect_tx` and completing its bytes after a random delay, asynchronous wgmma groups that retire
after random delays (`wait_group 1`). A CTA's k steps come in segments (one tile's part each: split-k and stream-K,
`sm90::segment_at`) that run through one ring; after each segment the consumers release the last stage and run
an epilogue in the ring's memory, and everyone meets at a barrier before the next. A random scheduler runs them;
the checks are the ones a wrong count or parity would break: no deadlock, a wgmma only reads a stage whose copies
for its k-step have all landed, a copy never overwrites a stage that a not-yet-retired wgmma reads, and nothing
writes the ring while an epilogue uses it. Run for every STAGES in the list and for k-step counts below, at and
above the ring size, in one segment and in several.
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
    def __init__(self, stages: int, consumers: int, segments: list[int], rng: random.Random):
        self.stages, self.segments, self.kc, self.rng = stages, segments, sum(segments), rng
        self.agents = PRODUCERS + consumers
        self.met = [0] * len(segments)  # arrivals at the barrier after each segment
        self.in_epilogue = 0  # consumers writing their epilogue into the ring's memory
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

    def meet(self, seg: int):
        """named_barrier(3) after segment `seg`: arrive, then wait for every thread of the CTA."""
        self.met[seg] += 1
        while self.met[seg] < self.agents:
            yield


def producer(m: Machine, pid: int, early: bool = False, late_expect: bool = False, skip_meet: bool = False):
    issued = []  # k-steps (ring positions) whose copies this thread has issued

    def arrive_on_copies(kc):  # cp.async.mbarrier.arrive.noinc: fires once all copies issued so far have landed
        def fire():
            if early or all(m.landed[(pid, k)] for k in issued[: issued.index(kc) + 1]):
                m.full[kc % m.stages].arrive()
            else:
                m.later(fire)
        m.later(fire)

    kc = 0  # ring position
    for seg, steps in enumerate(m.segments):
        for _ in range(steps):
            s = kc % m.stages
            if kc >= m.stages:
                while not m.empty[s].done(((kc // m.stages) - 1) & 1):
                    yield
            # the copies of this k-step: nobody may still be reading the stage, nor writing an epilogue there
            assert not m.readers[s], f"producer {pid} overwrites stage {s} (k-step {kc}) under wgmma {m.readers[s]}"
            assert not m.in_epilogue, f"producer {pid} writes stage {s} (k-step {kc}) during an epilogue"
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
            kc += 1
        if seg + 1 < len(m.segments):
            if skip_meet:
                m.met[seg] += 1
            else:
                yield from m.meet(seg)
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


def consumer(m: Machine, cid: int, keep_last: bool = False):
    inflight = []  # k-steps of this warpgroup's committed wgmma groups not yet retired

    def retire(k):
        m.readers[k % m.stages].discard((cid, k))
        inflight.remove(k)

    kc = 0  # ring position
    for seg, steps in enumerate(m.segments):
        for ks in range(steps):  # consume_ring
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
            if ks > 0:
                for _ in range(WARPS_PER_WG):  # lane 0 of each warp
                    m.empty[(kc - 1) % m.stages].arrive()
            yield
            kc += 1
        while inflight:  # wgmma.wait_group 0
            yield
        if not keep_last:  # the segment's last stage
            for _ in range(WARPS_PER_WG):
                m.empty[(kc - 1) % m.stages].arrive()
        # epilogue (store_tile) in the ring's memory: every copy the producers issued must have landed
        m.in_epilogue += 1
        assert all(m.landed.values()), f"consumer {cid}'s epilogue after segment {seg} while copies still land"
        yield
        m.in_epilogue -= 1
        if seg + 1 < len(m.segments):
            yield from m.meet(seg)


class Stuck(Exception):
    """No agent can make progress: a deadlock."""


def run(stages: int, consumers: int, segments: int | list[int], seed: int, early: bool = False, late_expect: bool = False,
        skip_meet: bool = False, keep_last: bool = False) -> None:
    segments = [segments] if isinstance(segments, int) else segments
    kc = sum(segments)
    rng = random.Random(seed)
    m = Machine(stages, consumers, segments, rng)
    agents = ([producer(m, p, early, late_expect, skip_meet) for p in range(PRODUCERS)]
              + [consumer(m, c, keep_last) for c in range(consumers)])
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
    raise Stuck(f"STAGES={stages} consumers={consumers} segments={segments} seed={seed}")


STAGES = sorted({v.stages for v in variants.VARIANTS if isinstance(v, variants.Wgmma)})


@pytest.mark.parametrize("stages", STAGES)
@pytest.mark.parametrize("kc", [1, 2, 3, 7, 13])
def test_protocol_under_random_schedules(stages, kc):
    for seed in range(25):
        run(stages, 2, kc, seed * 1000 + stages * 10 + kc)


@pytest.mark.parametrize("stages", STAGES)
@pytest.mark.parametrize("segments", [[3, 13], [1, 1, 1], [13, 2, 7], [2, 9]])
def test_segments_share_one_ring(stages, segments):
    # stream-K / split-k: a CTA's k steps in several tiles' segments, an epilogue and a barrier between them.
    for seed in range(25):
        run(stages, 2, segments, seed * 1000 + stages * 10 + len(segments))


def test_a_producer_that_does_not_wait_for_the_epilogue_is_caught():
    # Teeth: without the barrier after a segment, the next segment's copies land in the ring during the epilogue.
    with pytest.raises(AssertionError, match="epilogue"):
        for seed in range(50):
            run(4, 2, [5, 5], seed, skip_meet=True)


def test_a_segment_that_keeps_its_last_stage_deadlocks():
    # Teeth: the consumers must release the last stage of each segment, else a later segment waits for it forever.
    with pytest.raises(Stuck):
        run(4, 2, [5, 9], 1, keep_last=True)


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
