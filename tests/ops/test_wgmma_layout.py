"""The sm_90a sparse-wgmma kernel's data layout, checked on the CPU (no GPU, no nvcc needed; a host C++ compiler).

The kernel's index math lives in `csrc/vnm_sm90_layout.h`. `sm90_layout_dump.cpp` includes that very header and
dumps every mapping; this file then runs the kernel's data flow on the CPU (gathers into a shared-memory image,
operands read back the way the hardware reads them, accumulate, epilogue through stmatrix, copy-out) and compares
y with a float64 reference. What the hardware does is written here from the PTX ISA, independently of the kernel:

- B through its matrix descriptor: fields per "Matrix Descriptor Format"; the MN-major 128-byte-swizzle canonical
  layout ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)), T = 8 bf16, then Swizzle<3,4,3> on byte addresses.
- A from registers and the metadata: CUTLASS's ALayout_64x32 / ELayout_64x32 for sparse 16-bit m64nNk32 (thread
  (t, gid, warp), register r = v1 + 2 v2 holds the two kept values of row 16 warp + gid + 8 v1, 4-chunk t + 4 v2;
  selector 0: lanes t = 0, 1 hold the nibbles of chunks 0-3, 4-7, row gid at bit 4j, row gid + 8 at 16 + 4j).
- D: CLayout_64xN (register i: row 16 warp + gid + 8 ((i/2)%2), token 2t + i%2 + 8 (i/4)).
- stmatrix .trans: matrix q's fragment element (r, c) sits in lane 4r + c/2; stored row i (address of lane 8q + i)
  receives column i.

What this cannot check (the device run does, see docs/kernels.md): that the hardware matches those documents,
and everything about timing (barriers, proxy fences, races).
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from opshelp import fp64_reference, random_vnm, rel_err

from vnmsparse.ops import variants, pack_for_device

CSRC = Path(__file__).resolve().parents[2] / "src" / "vnmsparse" / "ops" / "csrc"
DUMP_SRC = Path(__file__).resolve().parent / "sm90_layout_dump.cpp"
SMEM_BASE = 0x2400 * 4  # a 1024-aligned, non-zero shared-memory address for the emulated stage
WGMMA = [v for v in variants.VARIANTS if isinstance(v, variants.Wgmma)]


@pytest.fixture(scope="module")
def dump_exe(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("needs a host C++ compiler to build the layout dump")
    exe = tmp_path_factory.mktemp("sm90") / "sm90_layout_dump"
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{CSRC}", str(DUMP_SRC), "-o", str(exe)], check=True)
    return exe


@functools.lru_cache(maxsize=None)
def _dump(exe: str, bn: int, rows: int, tiles_m: int, tiles_n: int, group_m: int, row_tiles: int) -> dict:
    out = subprocess.run([exe, *map(str, (bn, rows, tiles_m, tiles_n, group_m, row_tiles, SMEM_BASE))], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def dump(exe, *args) -> dict:
    return _dump(str(exe), *args)


# ---- the hardware, from the ISA -------------------------------------------------------------------------
def hw_read_b(smem: np.ndarray, desc: int, bn: int) -> np.ndarray:
    """B (32 x bn) as wgmma reads it through `desc` (N-major, imm-trans-b = 1) from a byte-addressed image."""
    start = (desc & 0x3FFF) << 4
    lbo = ((desc >> 16) & 0x3FFF) << 4
    sbo = ((desc >> 32) & 0x3FFF) << 4
    assert (desc >> 49) & 0x7 == 0 and desc >> 62 == 1, "expected base offset 0 and the 128-byte swizzle"
    k = np.arange(32)[:, None]
    n = np.arange(bn)[None, :]
    off = 2 * ((n % 8) + 8 * ((n // 8) % 8) + 64 * (k % 8)) + lbo * (n // 64) + sbo * (k // 8)
    addr = start + off
    phys = addr ^ (((addr >> 7) & 7) << 4)
    return smem[phys // 2]


def hw_a_operand(vals: np.ndarray, words: np.ndarray) -> np.ndarray:
    """A (64 x 32 logical) of one m64 tile from per-lane registers: vals (4 warps, 32 lanes, 8 values) and the
    metadata register of each lane, words (4, 32)."""
    w, lane, r = np.meshgrid(np.arange(4), np.arange(32), np.arange(4), indexing="ij")
    gid, t, v1, v2 = lane // 4, lane % 4, r % 2, r // 2
    row = 16 * w + gid + 8 * v1
    chunk = t + 4 * v2
    word = words[w, 4 * gid + chunk // 4]  # selector 0: lanes t = 0 (chunks 0-3) and t = 1 (chunks 4-7)
    nib = (word >> (16 * v1 + 4 * (chunk % 4))) & 0xF
    assert not np.isin(nib, (0b0000, 0b0101, 0b1010, 0b1111)).any(), "invalid 2:4 metadata reaches the tensor core"
    a = np.zeros((64, 32))
    a[row, 4 * chunk + (nib & 3)] = vals[w, lane, 2 * r]
    a[row, 4 * chunk + (nib >> 2)] = vals[w, lane, 2 * r + 1]
    return a


def hw_d_register(d: np.ndarray, warp: int, lane: int) -> np.ndarray:
    """The accumulator registers (bn / 2 values) lane `lane` of warp `warp` holds for D (64 x bn)."""
    i = np.arange(d.shape[1] // 2)
    m = 16 * warp + lane // 4 + 8 * ((i // 2) % 2)
    n = 2 * (lane % 4) + i % 2 + 8 * (i // 4)
    return d[m, n]


def hw_stmatrix_trans(image: np.ndarray, addrs: list[int], regs: np.ndarray) -> None:
    """stmatrix.sync.m8n8.x4.trans.b16: addrs[l] = row address given by lane l; regs (32 lanes, 4, 2 halves)."""
    for q in range(4):
        for i in range(8):
            col = [regs[4 * rr + i // 2, q, i % 2] for rr in range(8)]
            image[addrs[8 * q + i] // 2 : addrs[8 * q + i] // 2 + 8] = col


# ---- the kernel's data flow, with its own index math (dumped) -------------------------------------------------
def emulate(v: variants.Wgmma, p, x: torch.Tensor, bias, exe, desc_fault=None) -> np.ndarray:
    R, C = p.shape
    V = p.V
    Rt, Kc = p.a_vals.shape[:2]
    Bn, Gp = p.cols.shape[:2]
    N = x.shape[0]
    Np = -(-N // 8) * 8
    xt = np.zeros((C, Np))
    xt[:, :N] = x.double().numpy().T
    a_vals = p.a_vals.double().numpy()
    a_meta = p.a_meta.numpy().astype(np.int64) & 0xFFFFFFFF
    cols = p.cols.numpy().reshape(-1)
    bias_f = None if bias is None else bias.float().numpy()
    BM, BN = v.BM, v.BN
    blocks = BM // V if BM >= V else 1
    tiles_m, tiles_n = -(-R // BM), -(-N // BN)
    d = dump(exe, BN, 32 * blocks, tiles_m, tiles_n, 16, Rt)
    tile_bytes = d["b_tile_bytes"]
    g = np.array(d["gather"])  # warp, lane, iter, row, piece, owner, dst
    owned = {(w, l): row for w, l, row in d["owned_row"]}
    a_off = {(rt, l): (ao, eo) for rt, chunks, j, l, ao, eo in d["a_stage_offset"] if chunks == 1}
    st_rows = {(l, jj): (n, m) for l, jj, n, m in d["stmatrix_row"]}
    descs = [int(s) for s in d["b_desc"]]
    st_acc = np.array(d["stmatrix_acc"]).reshape(-1, 4)
    tile_of = {(local, v_, bm): b for local, v_, bm, b in d["b_tile_of"]}
    pitch = BM + 8
    y = np.full((N, R), np.nan)

    for m_t, n_t in d["tile_coord"]:
        m0, n0 = m_t * BM, n_t * BN
        blk0 = m0 // V
        acc = np.zeros((BM // 64, 64, BN))
        for kc in range(Kc):
            smem = np.full((SMEM_BASE + blocks * tile_bytes) // 2, np.nan)  # NaN: a read of an unwritten byte shows
            colreg = np.zeros((4, 32), dtype=np.int64)
            for (w, l), row in owned.items():
                if row < 32 * blocks:
                    colreg[w, l] = cols[(min(blk0 + row // 32, Bn - 1) * Gp + 8 * kc) * 4 + row % 32]
            for w, l, it, row, piece, owner, dst in g:
                n = n0 + 8 * piece
                c = colreg[w, owner]
                start = (SMEM_BASE + dst) // 2
                smem[start : start + 8] = xt[c, n : n + 8] if n < Np else 0.0
            # The stage's A regions as the TMA boxes fill them: records, then metadata words, of the CTA's row
            # tiles (zeros past R), as bytes; each lane then reads its fragment at the kernel's offsets.
            rts = m0 // 16 + np.arange(BM // 16)
            a_img = np.where((rts < Rt)[:, None, None], a_vals[np.minimum(rts, Rt - 1), kc], 0.0).reshape(-1)
            e_img = np.where((rts < Rt)[:, None], a_meta[np.minimum(rts, Rt - 1), kc], 0).reshape(-1)
            pad_meta = d["pad_meta"]  # the kernel's metadata for row tiles past R (its rows_real check)
            for local in range(BM // 64):
                b_tile = tile_of[(local, V, BM)]
                desc = descs[(b_tile * tile_bytes) // 1024]
                if desc_fault is not None:
                    desc = desc_fault(desc)
                B = hw_read_b(smem, desc, BN)
                offs = [[a_off[(local * 4 + w, lane)] for lane in range(32)] for w in range(4)]
                vals = np.array([[a_img[ao // 2 : ao // 2 + 8] for ao, _ in row] for row in offs])  # (4, 32, 8)
                words = np.array([[e_img[eo // 4] if m0 // 16 + local * 4 + w < Rt else pad_meta for _, eo in row]
                                  for w, row in enumerate(offs)])  # (4, 32)
                acc[local] += hw_a_operand(vals, words) @ B
        out = np.full(BN * pitch, np.nan)
        for local in range(BM // 64):
            for w in range(4):
                mrow = local * 64 + 16 * w
                regs = np.stack([hw_d_register(acc[local], w, lane) for lane in range(32)])  # (32, BN/2)
                rows = m0 + mrow + np.arange(32)[:, None] // 4 + 8 * ((np.arange(BN // 2)[None, :] // 2) % 2)
                if bias_f is not None:
                    regs = regs + np.where(rows < R, bias_f[np.minimum(rows, R - 1)], 0.0)
                regs = torch.from_numpy(regs).float().to(x.dtype).double().numpy()
                for jj in range(BN // 16):
                    idx = st_acc[jj]
                    r = np.stack([np.stack([regs[:, i], regs[:, i + 1]], axis=-1) for i in idx], axis=1)  # (32, 4, 2)
                    addrs = [2 * (st_rows[(lane, jj)][0] * pitch + mrow + st_rows[(lane, jj)][1]) for lane in range(32)]
                    hw_stmatrix_trans(out, addrs, r)
        tile = out.reshape(BN, pitch)
        for nl in range(BN):
            n = n0 + nl
            if n < N:
                m_hi = min(R, m0 + BM)
                y[n, m0:m_hi] = tile[nl, : m_hi - m0]
    return y


# ---- tests ---------------------------------------------------------------------------------------------------
def _case_shapes(V: int):
    return [(2 * V + 3, 77, f"{V}:2:5", 17, True), (V * 3 + 11, 200, f"{V}:2:8", 300, False), (5, 33, f"{V}:2:16", 1, False)]


@pytest.mark.parametrize("variant", WGMMA, ids=lambda v: v.tag)
def test_emulated_kernel_matches_reference(dump_exe, variant):
    for i, (R, C, pattern, N, permute) in enumerate(_case_shapes(variant.V)):
        t = random_vnm(R, C, pattern, permute=permute, seed=R + N)
        p = pack_for_device(t, "cpu")
        x = torch.randn(N, C, generator=torch.Generator().manual_seed(N)).to(torch.bfloat16)
        bias = torch.randn(R).to(torch.bfloat16) if i != 1 else None
        y = emulate(variant, p, x, bias, dump_exe)
        assert np.isfinite(y).all(), f"{variant.tag} R={R} N={N}: an output left unwritten or fed by unwritten smem"
        err = rel_err(torch.from_numpy(y), fp64_reference(x, t, bias))
        assert err < 1e-2, f"{variant.tag} R={R} C={C} N={N} {pattern}: rel err {err:.2e}"


def test_emulation_catches_a_wrong_descriptor(dump_exe):
    # The check has teeth: swapping the descriptor's two strides (a plausible mistake) must break the result.
    variant = WGMMA[0]
    R, C, pattern, N, _ = _case_shapes(variant.V)[1]
    t = random_vnm(R, C, pattern, seed=1)
    p = pack_for_device(t, "cpu")
    x = torch.randn(N, C).to(torch.bfloat16)

    def swap_strides(desc: int) -> int:
        lbo, sbo = (desc >> 16) & 0x3FFF, (desc >> 32) & 0x3FFF
        return (desc & ~((0x3FFF << 16) | (0x3FFF << 32))) | (sbo << 16) | (lbo << 32)

    y = emulate(variant, p, x, None, dump_exe, desc_fault=swap_strides)
    assert not np.isfinite(y).all() or rel_err(torch.from_numpy(y), fp64_reference(x, t)) > 0.1


@pytest.mark.parametrize("bn,blocks", [(64, 4), (128, 1), (128, 2), (128, 4), (256, 1), (256, 2)])
def test_producer_covers_every_piece_once_and_steps_affinely(dump_exe, bn, blocks):
    d = dump(dump_exe, bn, 32 * blocks, 3, 5, 2, 9)
    g = np.array(d["gather"])
    rows, pieces = g[:, 3], g[:, 4]
    assert len(g) == 32 * blocks * (bn // 8)
    assert len({(r, q) for r, q in zip(rows, pieces)}) == len(g)  # every (row, piece) exactly once
    assert len(set(g[:, 6])) == len(g) and g[:, 6].max() < blocks * d["b_tile_bytes"]  # distinct, inside the stage
    assert (g[:, 6] % 16 == 0).all()  # 16-byte aligned for cp.async
    # The kernel computes dst(it) = dst(it % 2) + (it // 2) * step: check that identity for every thread.
    by = {(w, l, it): dst for w, l, it, _, _, _, dst in g}
    for (w, l, it), dst in by.items():
        assert dst == by[(w, l, it % 2)] + (it // 2) * d["gather_step"]
    # The column index a lane shuffles from is the one its owner loaded for that row.
    owned = {(w, l): row for w, l, row in d["owned_row"]}
    for w, l, it, row, _, owner, _ in g:
        assert owned[(w, owner)] == row
    # One warp instruction writes 32 pieces: at most 4 per 128-byte line -> 4 wavefronts, no bank conflicts beyond.
    for (w, it) in {(w, it) for w, _, it, *_ in g}:
        sel = g[(g[:, 0] == w) & (g[:, 2] == it)]
        banks = ((sel[:, 6] // 16) % 8).tolist()
        assert max(banks.count(b) for b in set(banks)) <= 4


def test_raster_visits_every_tile_once(dump_exe):
    for tiles_m, tiles_n, group in ((37, 5, 16), (3, 7, 16), (16, 1, 16), (33, 33, 8)):
        d = dump(dump_exe, 128, 64, tiles_m, tiles_n, group, 9)
        coords = [tuple(c) for c in d["tile_coord"]]
        assert sorted(coords) == [(m, n) for m in range(tiles_m) for n in range(tiles_n)]


def _schedule(exe, tiles: int, kc: int, ksplit: int, sms: int) -> dict:
    out = subprocess.run([str(exe), "schedule", str(tiles), str(kc), str(ksplit), str(sms)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("tiles,kc,ksplit", [
    (144, 64, 0), (86, 64, 0), (132, 64, 0), (264, 64, 0), (1, 1, 0), (7, 13, 0), (3, 200, 0), (1000, 7, 0),
    (144, 64, 1), (144, 64, 2), (5, 3, 8), (10, 64, 3), (1, 1, 4),
])
def test_k_schedule_covers_every_step_once(dump_exe, tiles, kc, ksplit):
    """The CTAs' segments (split-k: ksplit slices per tile; 0: stream-K over 132 SMs) cover every k step of every
    tile exactly once; each tile's segments are numbered 0.. in k order with the right count, within the workspace's
    slots; every CTA has work and its last segment, only that one, says so."""
    sms = 132
    d = _schedule(dump_exe, tiles, kc, ksplit, sms)
    ctas, segments = d["ctas"], d["segments"]
    if ksplit:
        assert ctas == tiles * min(ksplit, kc) and d["slices"] == min(ksplit, kc)
    else:
        assert ctas == min(sms, tiles * kc)
    covered = np.zeros((tiles, kc), dtype=int)
    per_tile: dict[int, list] = {}
    per_cta: dict[int, list] = {}
    for cta, tile, kbeg, steps, slice_, slices, last in segments:
        assert steps >= 1 and 0 <= kbeg and kbeg + steps <= kc
        covered[tile, kbeg:kbeg + steps] += 1
        per_tile.setdefault(tile, []).append((kbeg, slice_, slices, cta))
        per_cta.setdefault(cta, []).append((steps, last))
    assert (covered == 1).all()
    assert sorted(per_cta) == list(range(ctas))
    for segs in per_cta.values():
        assert [last for _, last in segs] == [0] * (len(segs) - 1) + [1]
    shares = [sum(steps for steps, _ in segs) for segs in per_cta.values()]
    assert max(shares) - min(shares) <= (0 if ksplit and kc % min(ksplit, kc) == 0 else 1)
    for segs in per_tile.values():
        segs.sort()
        assert [s[1] for s in segs] == list(range(len(segs)))  # slices in k order
        assert all(s[2] == len(segs) for s in segs) and len(segs) <= d["slices"]
        assert [s[3] for s in segs] == sorted(s[3] for s in segs)  # consecutive CTAs


def test_descriptor_fields(dump_exe):
    for bn in (64, 128, 256):
        d = dump(dump_exe, bn, 64, 1, 1, 16, 4)
        for i, s in enumerate(d["b_desc"]):
            desc = int(s)
            assert (desc & 0x3FFF) << 4 == (SMEM_BASE + 1024 * i) & 0x3FFFF  # start address
            assert ((desc >> 16) & 0x3FFF) << 4 == 1024  # LBO: next 64 tokens
            assert ((desc >> 32) & 0x3FFF) << 4 == 16 * bn  # SBO: next 8 k-rows
            assert desc >> 62 == 1 and (desc >> 49) & 7 == 0


def test_smem_budget_of_every_variant():
    # Mirrors WgmmaShape's static_asserts so a new list entry fails here before it fails in nvcc.
    for v in WGMMA:
        blocks = v.BM // v.V if v.BM >= v.V else 1
        ring = v.stages * blocks * 64 * v.BN
        out = v.BN * (v.BM + 8) * 2
        assert max(ring, out) + 1024 <= 227 * 1024, v.tag
        assert v.wg_m * v.BN // 2 <= 128 and v.BN % 64 == 0 and 32 * blocks <= 128, v.tag
        assert math.gcd(v.BM, v.V) == min(v.BM, v.V), v.tag


# ---- the window kernel's B operand (vnm_wgmma_window.cuh) ----------------------------------------------------
def hw_read_b_kmajor(smem: np.ndarray, desc: int, bn: int) -> np.ndarray:
    """B (32 x bn) as wgmma reads it through `desc` with imm-trans-b = 0 (K-major) and the 128-byte swizzle: token
    n's 64 k-values fill line n % 8 of its 8-token atom, atoms SBO apart; the start address may sit inside a line."""
    start = (desc & 0x3FFF) << 4
    sbo = ((desc >> 32) & 0x3FFF) << 4
    assert (desc >> 49) & 0x7 == 0 and desc >> 62 == 1, "expected base offset 0 and the 128-byte swizzle"
    k = np.arange(32)[:, None]
    n = np.arange(bn)[None, :]
    addr = start + 128 * (n % 8) + 2 * k + sbo * (n // 8)
    phys = addr ^ (((addr >> 7) & 7) << 4)
    return smem[phys // 2]


def tma_write_x_tile(x_tile: np.ndarray, base: int, size: int) -> np.ndarray:
    """A [tokens x 64 columns] box as TMA lands it with CU_TENSOR_MAP_SWIZZLE_128B: token n is the 128-byte line n,
    its 16-byte chunk c at chunk c ^ (n % 8) (the swizzle of bits 4-6 by bits 7-9 of a 1024-aligned address)."""
    smem = np.full(size // 2, np.nan)
    for n in range(x_tile.shape[0]):
        for c in range(8):
            dst = base + n * 128 + ((c ^ (n % 8)) * 16)
            smem[dst // 2 : dst // 2 + 8] = x_tile[n, 8 * c : 8 * c + 8]
    return smem


def test_window_b_operand_reads_the_columns_tma_wrote(dump_exe):
    bn = 256
    d = dump(dump_exe, bn, 64, 1, 1, 16, 1)
    assert d["window_cols"] == 64  # one 128-byte swizzle line of 16-bit values per token
    x_tile = np.arange(bn * 64, dtype=np.float64).reshape(bn, 64)  # every element distinct
    smem = tma_write_x_tile(x_tile, SMEM_BASE, SMEM_BASE + bn * 128)
    descs = [int(v) for v in d["bk_desc"]]
    for j in (0, 1):  # the stage's two k32 operands: columns 32j .. 32j + 31
        B = hw_read_b_kmajor(smem, descs[j], bn)
        assert np.array_equal(B, x_tile[:, 32 * j : 32 * j + 32].T), f"k32 half {j} reads other columns"
    # A later stage (a multiple of 1024 bytes on) is addressed the same way.
    assert ((descs[2] & 0x3FFF) - (descs[0] & 0x3FFF)) << 4 == 1024
